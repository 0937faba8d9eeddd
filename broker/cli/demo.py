"""`amo-broker demo`: the sandbox amoCRM on loopback and a real broker in front of it.

Everything is real except amoCRM: a throwaway key file and store in a temp directory, the
first pair obtained through the authorization-code grant, the same `serve` as production.
The temp directory holds a config file, so a second terminal can run `amo-broker refresh`
against the same store while the demo serves, the cross-process case in miniature.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from broker.config.keyfile import write_key_file
from broker.config.load import load_config
from broker.sandbox.server import Sandbox, start_sandbox
from broker.service import open_runtime, serve
from broker.store.sealing import new_key
from broker.tokens.importing import import_pair


async def run_demo(port: int, sandbox_port: int, token_ttl: int, log_format: str) -> int:
    """Run sandbox and broker until Ctrl-C; clean up the temp directory after."""
    workdir = Path(tempfile.mkdtemp(prefix="amo-broker-demo-"))
    # amoCRM's own limit, enforced: the broker's pacing is what keeps the demo out of 429s.
    sandbox = Sandbox(access_ttl=token_ttl, rate_limit_rps=7)
    runner, sandbox_url = await start_sandbox(sandbox, port=sandbox_port)
    try:
        config_path = _write_config(workdir, sandbox, sandbox_url, port, token_ttl, log_format)
        config = load_config(config_path, environ={})
        async with open_runtime(config) as runtime:
            assert runtime.oauth is not None  # noqa: S101 -- the demo config has a client
            pair = await runtime.oauth.exchange_code(sandbox.issue_code(), now=time.time())
            await import_pair(runtime.store, pair, reason="import", outcome="exchanged")
        return await serve(
            config, on_ready=lambda url: print(_banner(url, sandbox_url, config_path), flush=True)
        )
    finally:
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _write_config(
    workdir: Path, sandbox: Sandbox, sandbox_url: str, port: int, ttl: int, log_format: str
) -> Path:
    write_key_file(workdir / "broker.key", new_key())
    config_path = workdir / "broker.toml"
    # A margin of a third of the lifetime: with the default 15-minute tokens, the broker
    # rotates on its own after 10 minutes, so a patient viewer sees a proactive refresh.
    config_path.write_text(
        f"""# written by `amo-broker demo`; deleted when it stops
[amocrm]
base_url = "{sandbox_url}"
client_id = "{sandbox.client_id}"
client_secret = "{sandbox.client_secret}"
redirect_uri = "{sandbox.redirect_uri}"

[server]
host = "127.0.0.1"
port = {port}

[store]
path = "broker.db"
key_file = "broker.key"

[refresh]
margin_seconds = {max(ttl // 3, 1)}

[limits]
# A short cool-down, so a demo that plays a blocked account recovers in half a minute; a
# caller's patience shorter than it, so a call during the block shows its 503 at once
# (a block that ends within max_wait_seconds is waited out by reads instead).
block_cooldown_seconds = 30
max_wait_seconds = 15

[log]
format = "{log_format}"
""",
        encoding="utf-8",
    )
    config_path.chmod(0o600)
    return config_path


def _banner(url: str, sandbox_url: str, config_path: Path) -> str:
    me = shutil.which("amo-broker") or f"{sys.executable} -m broker"
    return f"""
amo-broker demo is running
  broker            {url}
  sandbox amoCRM    {sandbox_url}   (emulated; tokens live only in this demo)
  store and key     {config_path.parent}

Try it from another terminal:
  curl -s {url}/api/v4/leads                         # your service's call: no credentials
  curl -s -X POST {url}/api/v4/leads -H 'Content-Type: application/json' \\
       -d '[{{"name": "Demo deal", "price": 1000}}]'
  curl -s {url}/status                               # state, generation, expiry
  curl -s -X POST {sandbox_url}/_sandbox/expire      # amoCRM drops the token: the next
  curl -s {url}/api/v4/contacts                      #   call gets a 401, refreshes, replays
  BROKER_CONFIG={config_path} {me} refresh      # rotate now from another process:
  curl -s {url}/status                               #   "generation" grows (within 5 s here)

amoCRM's limit (7 calls a second, enforced by the sandbox too):
  for i in $(seq 30); do curl -s -o /dev/null -w '%{{http_code}} ' {url}/api/v4/leads & done; wait
                                                     # 30 at once: paced in a queue, all 200
  {me} status --url {url}             # the summary: state, pace, queue, amoCRM's answers
  curl -s {url}/metrics | grep -E '^amo_broker_(queue|requests)'   # Prometheus metrics
  curl -s -X POST {sandbox_url}/_sandbox/block       # amoCRM blocks the account: three
  curl -s {url}/api/v4/leads                         #   403s, then 503 account_blocked
  curl -s -X POST {sandbox_url}/_sandbox/unblock     #   lifted 30 s later, by a probe call

Ctrl-C stops the demo and deletes its temp directory.
"""
