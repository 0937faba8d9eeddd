"""amoCRM's links in answers lead back through the broker, and nothing else in an answer moves."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from broker.config.load import load_config
from broker.sandbox.server import Sandbox
from broker.server.links import MAX_REWRITE
from tests.conftest import Broker, ConfigFactory, serving_broker
from tests.server.test_accounts import TWO_ACCOUNTS, seed, serving, write_config

# Fixtures of the two-account tests, imported as themselves so pytest finds them here too.
from tests.server.test_accounts import env as env
from tests.server.test_accounts import other_sandbox as other_sandbox

AiohttpClient = Callable[..., object]
# Answers the sandbox does not give, served in front of it (see `sandbox_url` below).
FIXED_PATHS = ("/api/v4/moved", "/api/v4/big", "/api/v4/text", "/api/v4/plain", "/api/v4/near")


def own_origin(request: web.Request) -> str:
    assert request.transport is not None
    host, port = request.transport.get_extra_info("sockname")[:2]
    return f"http://{host}:{port}"


def fixed_answer(request: web.Request) -> web.Response:
    """A redirect, a body over the bound, a text body, JSON without links, and a near miss."""
    origin = own_origin(request)
    link = {"href": f"{origin}/api/v4/leads?page=2&limit=2"}
    if request.path == "/api/v4/moved":
        return web.Response(status=302, headers={"Location": link["href"]})
    if request.path == "/api/v4/big":
        pad = "x" * (MAX_REWRITE + 1)
        return web.json_response({"_links": {"next": link}, "pad": pad})
    if request.path == "/api/v4/text":
        return web.Response(text=json.dumps({"_links": {"next": link}}), content_type="text/plain")
    if request.path == "/api/v4/plain":
        return web.Response(
            body=b'{ "price": 1.50, "name": "\\u0421\\/x" }', content_type="application/json"
        )
    # The host is there (the pre-check finds it), but in no `href` on amoCRM's origin.
    near = {"site": link["href"], "_links": {"self": {"href": f"{origin}/leads/detail/1"}}}
    return web.Response(body=json.dumps(near, indent=1).encode(), content_type="application/json")


@web.middleware
async def in_front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serve FIXED_PATHS; gzip any answer when the caller sends `X-Test-Gzip` (forwarded)."""
    if request.path in FIXED_PATHS:
        return fixed_answer(request)
    response = await handler(request)
    if request.headers.get("X-Test-Gzip") and isinstance(response, web.Response):
        response.enable_compression(web.ContentCoding.gzip)
    return response


@pytest.fixture
async def sandbox_url(sandbox: Sandbox) -> AsyncIterator[str]:
    """The sandbox with `in_front` before its /api/v4 (the recording middleware sees all)."""
    app = sandbox.app()
    app.middlewares.append(in_front)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def at_broker(broker: Broker, path: str) -> str:
    return str(broker.client.make_url(path))


async def follow(url: str, **headers: str) -> aiohttp.ClientResponse:
    """GET `url` as a client following a link does: no token, nothing of the broker's."""
    async with aiohttp.ClientSession() as session:
        response = await session.get(url, headers=headers, allow_redirects=False)
        await response.read()
        return response


async def test_following_next_stays_on_the_broker(broker: Broker) -> None:
    """`_links.next` leads to the broker, which fetches page 2 from amoCRM with its token."""
    page = await (await broker.client.get("/api/v4/leads?limit=2")).json()
    links = page["_links"]
    assert links["self"]["href"] == at_broker(broker, "/api/v4/leads?page=1&limit=2")
    assert links["next"]["href"] == at_broker(broker, "/api/v4/leads?page=2&limit=2")
    for lead in page["_embedded"]["leads"]:
        assert lead["_links"]["self"]["href"] == at_broker(broker, f"/api/v4/leads/{lead['id']}")
    second = await follow(links["next"]["href"])
    assert second.status == 200
    after = json.loads(await second.read())
    assert after["_page"] == 2
    assert after["_links"]["prev"]["href"] == at_broker(broker, "/api/v4/leads?page=1&limit=2")
    assert [r.raw_path for r in broker.sandbox.requests][-1] == "/api/v4/leads?page=2&limit=2"
    assert broker.sandbox.requests[-1].authorized


async def test_a_full_page_over_64_kib_is_rewritten_too(broker: Broker) -> None:
    """A page of 250 leads (over 64 KiB, the small-answer size) gets broker links too."""
    rows = [{"name": f"Сделка номер {i}: поставка оборудования", "price": i} for i in range(260)]
    assert (await broker.client.post("/api/v4/leads", json=rows)).status == 200
    answer = await broker.client.get("/api/v4/leads?limit=250")
    raw = await answer.read()
    assert 64 * 1024 < len(raw) < MAX_REWRITE
    assert int(answer.headers["Content-Length"]) == len(raw)
    page = json.loads(raw)
    assert page["_links"]["next"]["href"] == at_broker(broker, "/api/v4/leads?page=2&limit=250")
    assert len(page["_embedded"]["leads"]) == 250
    assert all(
        lead["_links"]["self"]["href"].startswith(at_broker(broker, "/api/v4/leads/"))
        for lead in page["_embedded"]["leads"]
    )


async def test_php_escaped_slashes_are_found_and_moved(broker: Broker) -> None:
    """A body written as PHP writes it (`https:\\/\\/host\\/api...`) has its links moved too."""
    broker.sandbox.php_escaped_slashes = True
    answer = await broker.client.get("/api/v4/leads?limit=2")
    page = json.loads(await answer.read())
    assert page["_links"]["next"]["href"] == at_broker(broker, "/api/v4/leads?page=2&limit=2")
    assert (await follow(page["_links"]["next"]["href"])).status == 200
    assert broker.sandbox.requests[-1].authorized


async def test_a_gzip_answer_is_decoded_rewritten_and_sent_plain(broker: Broker) -> None:
    """amoCRM's gzip JSON comes back uncompressed, with broker links and a right length."""
    answer = await broker.client.get(
        "/api/v4/leads?limit=2",
        headers={"X-Test-Gzip": "1", "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    raw = await answer.read()
    assert "Content-Encoding" not in answer.headers
    assert int(answer.headers["Content-Length"]) == len(raw)
    page = json.loads(raw)
    assert page["_links"]["next"]["href"] == at_broker(broker, "/api/v4/leads?page=2&limit=2")


async def test_a_gzip_answer_without_links_keeps_its_encoding(broker: Broker) -> None:
    """A compressed answer with nothing to move goes back compressed, byte for byte."""
    broker.sandbox.unauthorized_paths.add("/api/v4/leads")  # a problem+json, no links
    answer = await broker.client.get(
        "/api/v4/leads", headers={"X-Test-Gzip": "1"}, auto_decompress=False
    )
    raw = await answer.read()
    assert answer.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["status"] == 401


async def test_location_of_a_redirect_leads_to_the_broker(broker: Broker) -> None:
    """A 3xx Location on amoCRM's origin is moved onto the broker, path and query kept."""
    answer = await broker.client.get("/api/v4/moved", allow_redirects=False)
    assert answer.status == 302
    assert answer.headers["Location"] == at_broker(broker, "/api/v4/leads?page=2&limit=2")


@pytest.mark.parametrize("path", ["/api/v4/big", "/api/v4/text", "/api/v4/plain", "/api/v4/near"])
async def test_other_answers_pass_byte_for_byte(
    broker: Broker, sandbox_url: str, path: str
) -> None:
    """Over the bound, not JSON, without links, or links elsewhere: the exact bytes of amoCRM."""
    async with aiohttp.ClientSession() as session:
        direct = await (await session.get(sandbox_url + path)).read()
    relayed = await (await broker.client.get(path)).read()
    assert relayed == direct
    if path in ("/api/v4/big", "/api/v4/text"):
        assert sandbox_url.encode() + b"/api/v4/leads?page=2" in relayed  # left on amoCRM


async def test_public_url_is_where_links_lead(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """With `public_url` set, links lead there whatever Host the caller sent."""
    config = make_config(BROKER_PUBLIC_URL="https://broker.example.com/")
    async with serving_broker(config, sandbox, aiohttp_client) as broker:
        answer = await broker.client.get("/api/v4/leads?limit=2", headers={"Host": "inside:1"})
        moved = await broker.client.get("/api/v4/moved", allow_redirects=False)
        page = await answer.json()
    expected = "https://broker.example.com/api/v4/leads?page=2&limit=2"
    assert page["_links"]["next"]["href"] == expected
    assert moved.headers["Location"] == expected


async def test_host_header_decides_without_public_url(broker: Broker) -> None:
    """Links follow the Host the caller used (a name, not the socket's address)."""
    answer = await broker.client.get("/api/v4/leads?limit=2", headers={"Host": "broker.lan:8080"})
    page = await answer.json()
    assert page["_links"]["next"]["href"] == "http://broker.lan:8080/api/v4/leads?page=2&limit=2"


async def test_links_keep_the_account_prefix(
    tmp_path: Path,
    env: dict[str, str],
    sandbox: Sandbox,
    sandbox_url: str,
    other_sandbox: tuple[Sandbox, str],
    aiohttp_client: AiohttpClient,
) -> None:
    """Under /a/NAME (or X-Amo-Account) links lead to /a/NAME: page 2 reaches the same account."""
    other, other_url = other_sandbox
    path = write_config(tmp_path, TWO_ACCOUNTS.format(main=sandbox_url, other=other_url))
    config = load_config(path, environ=env)
    await seed(config, sandbox)
    await seed(config.for_account("agency-client"), other)
    async with serving(config, aiohttp_client) as broker:
        client = broker.client
        by_path = await (await client.get("/a/agency-client/api/v4/leads?limit=2")).json()
        by_header = await (
            await client.get("/api/v4/leads?limit=2", headers={"X-Amo-Account": "agency-client"})
        ).json()
        plain = await (await client.get("/api/v4/leads?limit=2")).json()
        expected = str(client.make_url("/a/agency-client/api/v4/leads?page=2&limit=2"))
        assert by_path["_links"]["next"]["href"] == expected
        assert by_header["_links"]["next"]["href"] == expected
        assert plain["_links"]["next"]["href"] == str(
            client.make_url("/api/v4/leads?page=2&limit=2")
        )
        lead = by_path["_embedded"]["leads"][0]
        assert lead["_links"]["self"]["href"] == str(
            client.make_url(f"/a/agency-client/api/v4/leads/{lead['id']}")
        )
        second = await follow(expected)
    assert second.status == 200
    assert other.requests[-1].raw_path == "/api/v4/leads?page=2&limit=2"
    assert other.requests[-1].authorized
    assert "/api/v4/leads?page=2&limit=2" not in [r.raw_path for r in sandbox.requests]


async def test_a_large_answer_streams_untouched_when_the_memory_budget_is_short(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: AiohttpClient
) -> None:
    """Answers over 64 KiB are read whole only within max_buffered_bytes; else they stream."""
    config = make_config(BROKER_MAX_BODY_BYTES="40000", BROKER_MAX_BUFFERED_BYTES="40000")
    async with serving_broker(config, sandbox, aiohttp_client) as broker:
        rows = [{"name": f"Сделка номер {i}: поставка оборудования"} for i in range(30)]
        for _ in range(9):
            assert (await broker.client.post("/api/v4/leads", json=rows)).status == 200
        page = await (await broker.client.get("/api/v4/leads?limit=250")).json()
        assert page["_links"]["next"]["href"].startswith(config.base_url or "-")
        small = await (await broker.client.get("/api/v4/leads?limit=2")).json()
        assert small["_links"]["next"]["href"].startswith(at_broker(broker, "/api/v4/"))
