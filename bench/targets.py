"""Start the proxies under test, each alone on the proxy core: the broker, the yardstick, nginx.

The broker runs as in production (`amo-broker serve`, JSON logs at info to a file, caller
auth off on loopback) over a store seeded the way a person seeds it: `keygen`, then `import`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import PROXY_CPU, BenchError, Proc, free_port, wait_http
from bench.upstream import Upstream

REPO = Path(__file__).resolve().parent.parent
# Pacing (when the broker has it) must never be what is measured: set far above any rate here.
# Settings that do not exist are ignored by the broker's config, so these are safe to pass.
PACING = {"BROKER_RPS": "1000000", "BROKER_BURST": "1000000"}


@dataclass
class Target:
    """One way to reach the upstream: `proc` is None for direct, which sends the token itself."""

    name: str
    url: str
    proc: Proc | None
    auth: str | None = None


def _clean_env() -> dict[str, str]:
    # The caller's own broker settings must not leak into the bench (a real base URL!).
    return {k: v for k, v in os.environ.items() if not k.startswith(("AMOCRM_", "BROKER_"))}


def _cli(python: str) -> list[str]:
    """The installed `amo-broker` console script, as production runs it."""
    script = Path(python).parent / "amo-broker"
    return [str(script)] if script.exists() else [python, "-m", "broker"]


def broker_env(root: Path, name: str, upstream: Upstream, port: int) -> dict[str, str]:
    return {
        **_clean_env(),
        **upstream.client,
        **PACING,
        "AMOCRM_BASE_URL": upstream.url,
        "BROKER_DB": str(root / f"{name}.db"),
        "BROKER_KEY_FILE": str(root / f"{name}.key"),
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": str(port),
        "BROKER_LOG_FORMAT": "json",
        "BROKER_LOG_LEVEL": "info",
        "PYTHONPATH": str(REPO),
    }


def seed_store(python: str, root: Path, env: dict[str, str], refresh: str, access: str) -> None:
    """`amo-broker keygen --out`, then `amo-broker import` with the tokens in its environment."""
    log = root / "seed.log"
    steps = [
        ("keygen", [*_cli(python), "keygen", "--out", env["BROKER_KEY_FILE"]], env),
        (
            "import",
            [*_cli(python), "import"],
            {**env, "AMOCRM_REFRESH_TOKEN": refresh, "AMOCRM_ACCESS_TOKEN": access},
        ),
    ]
    for label, argv, step_env in steps:
        with log.open("ab") as out:
            done = subprocess.run(  # noqa: S603 -- our own CLI
                argv, env=step_env, cwd=root, stdout=out, stderr=subprocess.STDOUT, check=False
            )
        if done.returncode != 0:
            raise BenchError(f"`amo-broker {label}` failed ({done.returncode}); see {log}")


def start_broker(
    python: str,
    root: Path,
    upstream: Upstream,
    pair: dict[str, str],
    *,
    name: str = "broker",
    uvloop: bool = False,
    extra: dict[str, str] | None = None,
) -> Target:
    """Seed a store and run `amo-broker serve` on the proxy core; wait until /readyz is 200."""
    port = free_port()
    env = {**broker_env(root, name, upstream, port), **(extra or {})}
    seed_store(python, root, env, pair["refresh_token"], pair["access_token"])
    argv = [python, "-m", "bench.run_broker_uvloop"] if uvloop else _cli(python)
    argv = [*argv, "serve"]
    # cwd: a ./broker.toml in the caller's directory must not configure the bench broker.
    proc = Proc(name, argv, cpu=PROXY_CPU, log=root / f"{name}.log", env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", proc)
    return Target(name, url, proc)


def start_yardstick(python: str, root: Path, upstream: Upstream, token: str) -> Target:
    port = free_port()
    argv = [python, "-m", "bench.yardstick", "--port", str(port), "--upstream", upstream.url]
    env = {**_clean_env(), "BENCH_TOKEN": token, "PYTHONPATH": str(REPO)}
    proc = Proc("yardstick", argv, cpu=PROXY_CPU, log=root / "yardstick.log", env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + upstream.paths["1k"], proc)
    return Target("yardstick", url, proc)


def python_for_children() -> str:
    return sys.executable
