"""The fast upstream (nginx serving fixed bodies behind a bearer check) and nginx as a proxy.

nginx is the upstream because it is not the bottleneck: a Python upstream on the same core as
wrk would cap every proxy at its own speed and hide their differences. When nginx is missing,
the broker's sandbox stands in (fewer scenarios, and a warning in the report).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOAD_CPU, PROXY_CPU, BenchError, Proc, free_port, wait_http

BODIES = {"1k": 1024, "256k": 256 * 1024}
BIG_NAME, BIG_SIZE = "1g", 1 << 30
PATHS = {name: f"/api/v4/bench/{name}" for name in (*BODIES, BIG_NAME)}

_PROBLEM_401 = {
    "title": "Unauthorized",
    "type": "https://httpstatus.es/401",
    "status": 401,
    "detail": "Неверный логин или пароль",
}


@dataclass
class Upstream:
    """Where the upstream listens and what it serves."""

    url: str
    proc: Proc
    kind: str  # "nginx" or "sandbox"
    paths: dict[str, str]
    client: dict[str, str]  # AMOCRM_CLIENT_ID/SECRET/REDIRECT_URI for the broker's config


def unsigned_jwt(lifetime: float = 365 * 86400.0) -> str:
    """Make an access token the broker schedules by its `exp` (far away: no refresh in a run)."""

    def seg(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    now = int(time.time())
    header = {"alg": "none", "typ": "JWT"}
    claims = {"iat": now, "nbf": now, "exp": now + int(lifetime), "sub": "amo-broker-bench"}
    parts = (json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(32))
    return ".".join(seg(p) for p in parts)


def json_body(size: int) -> bytes:
    """A leads-page-shaped JSON document of exactly `size` bytes."""
    leads = [{"id": 1000 + i, "name": f"Deal #{i}", "price": 100 * i} for i in range(size // 400)]
    doc = {"_page": 1, "_embedded": {"leads": leads}, "pad": ""}
    short = size - len(json.dumps(doc, separators=(",", ":")).encode())
    if short < 0:
        raise ValueError(f"cannot shape a {size}-byte body")
    doc["pad"] = "x" * short
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == size  # noqa: S101 -- a shaping bug would skew every number
    return body


def _write_site(root: Path) -> None:
    site = root / "www" / "api" / "v4" / "bench"
    site.mkdir(parents=True)
    for name, size in BODIES.items():
        (site / name).write_bytes(json_body(size))
    with (site / BIG_NAME).open("wb") as big:
        big.truncate(BIG_SIZE)  # sparse: 1 GiB of zeros that costs no disk and no page reads
    (root / "401.json").write_text(json.dumps(_PROBLEM_401, ensure_ascii=False))


def _common(root: Path, name: str) -> str:
    temp = root / f"{name}-temp"
    temp.mkdir()
    paths = "\n".join(
        f"  {kind}_temp_path {temp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {root / name}.pid;
error_log {root / name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{paths}
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  types {{ }}
  default_type application/json;
"""


def _upstream_conf(root: Path, port: int, token: str) -> str:
    # `master_process off`: one process, so its pid is the one whose memory we read.
    return (
        _common(root, "upstream")
        + f"""  sendfile on;
  map_hash_bucket_size 512;  # the key is a whole bearer token
  map $http_authorization $bench_authorized {{
    "Bearer {token}" 1;
    default 0;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    error_page 401 /_unauthorized;
    location /api/v4/ {{
      if ($bench_authorized = 0) {{ return 401; }}
      root {root / "www"};
    }}
    location = /_unauthorized {{
      internal;
      default_type application/problem+json;
      alias {root / "401.json"};
    }}
  }}
}}
"""
    )


def _proxy_conf(root: Path, port: int, upstream_port: int, token: str) -> str:
    # Buffered as nginx runs by default, but never to disk (proxy_max_temp_file_size 0): a
    # 1 GiB answer streams through its memory buffers, as the Python proxies stream theirs.
    return (
        _common(root, "nginx-proxy")
        + f"""  upstream amocrm {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /api/v4/ {{
      proxy_pass http://amocrm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""
    )


def _nginx(root: Path, name: str, conf: str, cpu: int, probe: str, expect: int) -> Proc:
    path = root / f"{name}.conf"
    path.write_text(conf)
    os.chmod(path, 0o600)  # it holds the bench token
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    # -e: nginx opens its error log before reading the config; keep it out of /var/log.
    argv = [nginx, "-p", str(root), "-e", str(root / f"{name}-error.log"), "-c", str(path)]
    proc = Proc(name, argv, cpu=cpu, log=root / f"{name}.out")
    wait_http(probe, proc, expect=expect)
    return proc


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def start_nginx_upstream(root: Path, token: str) -> Upstream:
    """Serve the fixed bodies on a free port, 401 problem+json without exactly our bearer."""
    _write_site(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    conf = _upstream_conf(root, port, token)
    proc = _nginx(root, "upstream", conf, LOAD_CPU, url + PATHS["1k"], 401)
    client = {
        "AMOCRM_CLIENT_ID": "bench-client",
        "AMOCRM_CLIENT_SECRET": "bench-client-secret-" + secrets.token_hex(8),
        "AMOCRM_REDIRECT_URI": "https://example.com/oauth/callback",
    }
    return Upstream(url, proc, "nginx", dict(PATHS), client)


def start_nginx_proxy(root: Path, upstream: Upstream, token: str) -> tuple[str, Proc]:
    """Run nginx as the native reference proxy, alone on the proxy core."""
    port = free_port()
    upstream_port = int(upstream.url.rsplit(":", 1)[1])
    conf = _proxy_conf(root, port, upstream_port, token)
    url = f"http://127.0.0.1:{port}"
    proc = _nginx(root, "nginx-proxy", conf, PROXY_CPU, url + PATHS["1k"], 200)
    return url, proc


def start_sandbox(
    root: Path, python: str, name: str = "sandbox"
) -> tuple[Upstream, dict[str, str]]:
    """Run the timed sandbox on the load core; return it and a live pair it issued."""
    pair_file = root / f"{name}-pair.json"
    info_file = root / f"{name}-info.json"
    argv = [python, "-m", "bench.timed_sandbox", "--pair-file", str(pair_file)]
    argv += ["--info-file", str(info_file)]
    proc = Proc(name, argv, cpu=LOAD_CPU, log=root / f"{name}.out")
    deadline = time.monotonic() + 30
    while not info_file.exists() or not info_file.read_text().endswith("\n"):
        proc.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not start; see {proc.log}")
        time.sleep(0.1)
    info = json.loads(info_file.read_text())
    pair = json.loads(pair_file.read_text())
    client = {
        "AMOCRM_CLIENT_ID": info["client_id"],
        "AMOCRM_CLIENT_SECRET": info["client_secret"],
        "AMOCRM_REDIRECT_URI": info["redirect_uri"],
    }
    paths = {"1k": "/api/v4/account"}  # the sandbox serves no fixed bodies: small only
    return Upstream(info["url"], proc, "sandbox", paths, client), pair
