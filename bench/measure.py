"""Run one measurement against one target: wrk load, a 1 GiB download, held connections, a 401.

Each function returns a flat dict of numbers; the driver files them by round and target.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.procs import LOAD_CPU, BenchError, peak_rss_mb, reset_peak, rss_mb
from bench.targets import Target

LUA = Path(__file__).resolve().parent / "wrk_report.lua"


def wrk(target: Target, path: str, *, connections: int, seconds: float) -> dict[str, Any]:
    """Load `target` with wrk on the load core; requests/s, latency percentiles, peak RSS."""
    env = {**os.environ, "BENCH_AUTH": target.auth or ""}
    argv = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{connections}"]
    argv += [f"-d{seconds:g}s", "--timeout", "10s", "-s", str(LUA), target.url + path]
    if target.proc is not None:
        reset_peak(target.proc.pid)
    done = subprocess.run(  # noqa: S603 -- fixed tools, our own arguments
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk against {target.name} failed: {done.stderr.strip()[:200]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(raw[k] for k in raw if k.endswith(("_errors", "timeouts")))
    result: dict[str, Any] = {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mbps": raw["bytes"] / (raw["duration_us"] / 1e6) / 1e6,
        "errors": errors,
        "requests": raw["requests"],
    }
    if target.proc is not None:
        target.proc.check_alive()
        result["peak_rss_mb"] = peak_rss_mb(target.proc.pid)
    return result


def download(target: Target, path: str, header_file: Path) -> dict[str, Any]:
    """Stream a large answer to /dev/null with curl; the proxy's peak RSS meanwhile."""
    argv = ["taskset", "-c", str(LOAD_CPU), "curl", "-sS", "-o", "/dev/null", "--max-time", "300"]
    argv += ["-w", "%{http_code} %{size_download} %{time_total}"]
    if target.auth is not None:
        argv += ["-H", f"@{header_file}"]  # the bearer from a 0600 file, not argv
    if target.proc is not None:
        reset_peak(target.proc.pid)
    done = subprocess.run(  # noqa: S603 -- fixed tools, our own arguments
        [*argv, target.url + path], capture_output=True, text=True, timeout=330, check=False
    )
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 3 or fields[0] != "200":
        raise BenchError(f"download through {target.name} failed: {done.stderr.strip()[:200]}")
    size, seconds = int(fields[1]), float(fields[2])
    result: dict[str, Any] = {"mbps": size / seconds / 1e6, "bytes": size}
    if target.proc is not None:
        result["peak_rss_mb"] = peak_rss_mb(target.proc.pid)
    return result


def idle(target: Target, path: str, requests: int = 10) -> dict[str, Any]:
    """RSS of a freshly started proxy after a few sequential requests (imports all done)."""
    assert target.proc is not None  # noqa: S101 -- proxies only
    for _ in range(requests):
        with urllib.request.urlopen(target.url + path, timeout=10) as answer:  # noqa: S310
            answer.read()
    time.sleep(0.5)
    return {"idle_rss_mb": rss_mb(target.proc.pid)}


def _request(path: str, host: str, *, close: bool) -> bytes:
    connection = "close" if close else "keep-alive"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n".encode()


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer with a Content-Length; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _connect(url: str, count: int) -> list[tuple[asyncio.StreamReader, Any]]:
    parts = urlsplit(url)
    conns: list[tuple[asyncio.StreamReader, Any]] = []
    for start in range(0, count, 100):  # batches: a listen backlog of 128 would drop SYNs
        batch = [
            asyncio.open_connection(parts.hostname, parts.port)
            for _ in range(start, min(count, start + 100))
        ]
        conns += await asyncio.gather(*batch)
    return conns


def _close(conns: list[tuple[asyncio.StreamReader, Any]]) -> None:
    for _, writer in conns:
        writer.close()


async def _held_rss(target: Target, path: str, count: int) -> dict[str, Any]:
    assert target.proc is not None  # noqa: S101 -- proxies only
    pid = target.proc.pid
    rest = rss_mb(pid)
    conns = await _connect(target.url, count)
    try:
        host = urlsplit(target.url).netloc
        # One request on each, answered and kept alive: the server holds a used connection's
        # state (parser, buffers, handler task), as it does for a pooled client.
        for _, writer in conns:
            writer.write(_request(path, host, close=False))
        statuses = await asyncio.gather(*(_read_answer(reader) for reader, _ in conns))
        await asyncio.sleep(0.5)
        held = rss_mb(pid)
    finally:
        _close(conns)
    bad = sum(1 for s in statuses if s != 200)
    return {"rest_rss_mb": rest, "held_rss_mb": held, "errors": bad}


def held_connections(target: Target, path: str, count: int = 256) -> dict[str, Any]:
    """RSS at rest after the load so far, then with `count` open client connections."""
    return asyncio.run(_held_rss(target, path, count))


def _get_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)  # noqa: S310 -- loopback sandbox
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())


async def _storm(broker: Target, sandbox_url: str, path: str, count: int) -> dict[str, Any]:
    before = _get_json(sandbox_url + "/_sandbox/stats")
    conns = await _connect(broker.url, count)
    done_at: list[float] = []

    async def one(reader: asyncio.StreamReader) -> int:
        status = await _read_answer(reader)
        done_at.append(time.time())
        return status

    try:
        _get_json(sandbox_url + "/_sandbox/expire", "POST")  # every live access token now 401s
        request = _request(path, urlsplit(broker.url).netloc, close=True)
        started = time.time()
        for _, writer in conns:
            writer.write(request)
        statuses = await asyncio.wait_for(asyncio.gather(*(one(reader) for reader, _ in conns)), 60)
    finally:
        _close(conns)
    after = _get_json(sandbox_url + "/_sandbox/stats")
    issued = [t for t in _get_json(sandbox_url + "/_bench/issued")["issued"] if t >= started]
    last = max(done_at)
    return {
        "refresh_calls": after["refresh_calls"] - before["refresh_calls"],
        "ok": sum(1 for s in statuses if s == 200),
        "errors": sum(1 for s in statuses if s != 200),
        "upstream_401s": after["unauthorized_api_calls"] - before["unauthorized_api_calls"],
        "from_first_ms": (last - started) * 1000,
        "after_token_ms": (last - issued[0]) * 1000 if issued else float("nan"),
    }


def storm(broker: Target, sandbox_url: str, path: str, count: int = 1000) -> dict[str, Any]:
    """Send `count` requests at once on open connections right after every token was expired."""
    return asyncio.run(_storm(broker, sandbox_url, path, count))
