"""The sandbox writes HAL links as amoCRM does: absolute, on its own host, PHP escapes optional."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker.sandbox.server import Sandbox, start_sandbox


@pytest.fixture
async def served() -> AsyncIterator[tuple[Sandbox, str, dict[str, str]]]:
    sandbox = Sandbox()
    runner, url = await start_sandbox(sandbox)
    auth = {"Authorization": f"Bearer {sandbox.issue_pair()['access_token']}"}
    yield sandbox, url, auth
    await runner.cleanup()


async def test_links_are_on_the_sandbox_origin_whatever_the_host_header(
    served: tuple[Sandbox, str, dict[str, str]],
) -> None:
    """A request naming another Host still gets links on the sandbox's own address."""
    _, url, auth = served
    async with aiohttp.ClientSession() as session:
        resp = await session.get(
            f"{url}/api/v4/leads?limit=2", headers={**auth, "Host": "proxy.example:8787"}
        )
        page = await resp.json()
    assert page["_links"]["next"]["href"] == f"{url}/api/v4/leads?page=2&limit=2"
    lead = page["_embedded"]["leads"][0]
    assert lead["_links"]["self"]["href"] == f"{url}/api/v4/leads/{lead['id']}"


async def test_php_escaped_slashes_write_json_as_php_does(
    served: tuple[Sandbox, str, dict[str, str]],
) -> None:
    """With the knob on, every '/' in a JSON answer is written `\\/`, as json_encode does."""
    sandbox, url, auth = served
    sandbox.php_escaped_slashes = True
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"{url}/api/v4/leads?limit=2", headers=auth)
        raw = await resp.read()
        denied = await (await session.get(f"{url}/api/v4/leads")).read()
    escaped = url.replace("/", "\\/").encode()
    assert escaped + b"\\/api\\/v4\\/leads?page=2&limit=2" in raw
    assert b"/" not in raw.replace(b"\\/", b"")
    assert int(resp.headers["Content-Length"]) == len(raw)
    assert b"https:\\/\\/httpstatus.es\\/401" in denied  # problem+json too
