"""A minimal aiohttp pass-through proxy: the yardstick the broker is measured against.

It does only what any Python proxy in front of amoCRM must do: one pooled ClientSession,
the Authorization header set, the body streamed back in the broker's chunk size. No path
checks, no header policy, no logging, no stats. What the broker costs over it is what its
features cost. The token comes from BENCH_TOKEN (never argv).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import aiohttp
from aiohttp import web

CHUNK = 64 * 1024
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding"})
_DROP_REQUEST = _HOP | {"host", "content-length"}


async def serve(port: int, upstream: str, token: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64),  # the broker's pool size
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )
    bearer = f"Bearer {token}"

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        headers["Authorization"] = bearer
        body = await request.read() if request.body_exists else None
        url = upstream + request.raw_path
        async with session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="Minimal aiohttp pass-through proxy.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port, no path")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream.rstrip("/"), os.environ["BENCH_TOKEN"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
