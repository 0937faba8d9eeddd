"""Run broker.sandbox.server for the benchmark, and record when each token pair is issued.

The 401 scenario measures from the token endpoint's answer to the last caller's answer;
the sandbox runs in another process, so it keeps the wall time of every pair it issues and
serves them at /_bench/issued. A live pair is written to `--pair-file` (mode 0600) for the
harness to import: tokens never pass through argv or stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.sandbox.server import Sandbox


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


async def _serve(pair_file: Path, info_file: Path) -> None:
    sandbox = Sandbox()
    issued: list[float] = []
    issue = sandbox.issue_pair

    def timed_issue() -> dict[str, Any]:
        pair = issue()
        issued.append(time.time())
        return pair

    _write_private(pair_file, json.dumps(issue()))  # the seed pair is not counted
    # The sandbox looks `issue_pair` up on every grant, so this sees the token endpoint's too.
    sandbox.issue_pair = timed_issue  # type: ignore[method-assign]

    async def issued_at(request: web.Request) -> web.Response:
        return web.json_response({"issued": issued})

    app = sandbox.app()
    app.router.add_get("/_bench/issued", issued_at)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        info = {
            "url": f"http://127.0.0.1:{port}",
            "client_id": sandbox.client_id,
            "client_secret": sandbox.client_secret,
            "redirect_uri": sandbox.redirect_uri,
        }
        await asyncio.to_thread(info_file.write_text, json.dumps(info) + "\n")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair-file", type=Path, required=True)
    parser.add_argument("--info-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.pair_file, args.info_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
