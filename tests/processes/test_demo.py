"""`amo-broker demo` as a newcomer runs it: a real process, its banner followed step by step."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.procs import free_port

pytestmark = pytest.mark.slow


def exists(path: Path) -> bool:
    return path.exists()


async def test_the_demo_banner_works_as_printed(tmp_path: Path) -> None:
    """Calls, a burst of 30 paced to 7/s, a block and its 503, then Ctrl-C cleans up."""
    port = free_port()
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "demo",
        "--port",
        str(port),
        "--log-format",
        "json",
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert demo.stdout is not None
    banner = ""
    try:
        async with asyncio.timeout(20):
            while "Ctrl-C stops the demo" not in banner:
                line = await demo.stdout.readline()
                assert line, f"the demo exited before its banner:\n{banner}"
                banner += line.decode()
        broker = f"http://127.0.0.1:{port}"
        sandbox = re.search(r"sandbox amoCRM\s+(\S+)", banner)
        workdir = re.search(r"store and key\s+(\S+)", banner)
        assert sandbox and workdir
        assert exists(Path(workdir[1], "broker.db"))

        async with aiohttp.ClientSession() as http:

            async def status_of(path: str, method: str = "GET", base: str = broker) -> int:
                async with http.request(method, base + path) as response:
                    await response.read()
                    return response.status

            assert await status_of("/api/v4/leads") == 200
            burst = await asyncio.gather(*(status_of("/api/v4/leads") for _ in range(30)))
            assert burst == [200] * 30  # the sandbox enforces 7/s: pacing kept it out of 429s

            assert await status_of("/_sandbox/block", "POST", sandbox[1]) == 200
            blocked = [await status_of("/api/v4/leads") for _ in range(4)]
            assert blocked == [403, 403, 403, 503]
            async with http.get(broker + "/status") as response:
                assert (await response.json())["state"] == "blocked"
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(demo.wait(), 20)
    assert code == 0
    assert not exists(Path(workdir[1]))  # the temp directory went with the demo
