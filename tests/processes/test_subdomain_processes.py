"""A renamed subdomain, met by real `serve` processes: followed, stored, kept over a restart."""

from __future__ import annotations

import aiohttp

from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from tests.procs import Issued, Processes, get, status_of


async def test_serve_follows_a_rename_and_restarts_at_the_new_host(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    seeded: TokenPair,
    issued: Issued,
) -> None:
    """After `POST /_sandbox/rename` a call reaches the new host, once; a restart goes there."""
    first = await procs.start()
    assert (await get(http, first)).status == 200
    async with http.post(sandbox_url + "/_sandbox/rename") as answer:
        new_url = (await answer.json())["url"]
    assert (await get(http, first)).status == 200
    status = await status_of(http, first)
    assert (status["state"], status["base_url_in_use"]) == ("ok", new_url)
    assert len(first.named("subdomain_changed")) == 1
    assert first.named("reauth_required") == []
    await first.terminate()

    retired_calls = sandbox.hosts.retired_host_calls
    second = await procs.start()
    assert (await get(http, second)).status == 200
    assert (await status_of(http, second))["base_url_in_use"] == new_url
    assert sandbox.hosts.retired_host_calls == retired_calls
    assert second.named("subdomain_changed") == []
    assert len(second.named("base_url_from_store")) == 1
    procs.assert_no_leak([*issued, seeded.access_token, seeded.refresh_token or ""])
