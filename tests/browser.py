"""Drive Debian's headless chromium through its own command line: the rendered DOM, a screenshot.

No selenium or playwright: `--dump-dom` prints the DOM after the page loaded, `--screenshot`
writes a PNG. Without chromium the browser tests skip and say why, except under CI (the
variable CI set), where they fail: CI must run them (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from tests.conftest import unavailable

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio")
TIMEOUT = 60.0  # a bound for a stuck browser, never a wait the test relies on


def chromium_binary() -> str:
    """Find chromium, or skip (fail under CI) with the reason."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("chromium is not installed (apt-get install -y chromium)")
    return found


async def _run(binary: str, profile: Path, *args: str) -> str:
    # Async: the broker under test serves in this very event loop while the browser loads.
    process = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def dump_dom(binary: str, profile: Path, url: str) -> str:
    """Load `url` and return the DOM as the browser built it."""
    return await _run(binary, profile, "--dump-dom", url)


async def screenshot(binary: str, profile: Path, url: str, path: Path) -> None:
    """Load `url` and write what a 1200x900 window shows to `path` (PNG)."""
    await _run(binary, profile, f"--screenshot={path}", "--window-size=1200,900", url)
    with path.open("rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
