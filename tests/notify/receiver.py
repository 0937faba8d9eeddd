"""A real webhook receiver on a loopback port: records what arrives, answers as told, goes down."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.procs import free_port, until


@dataclass
class Received:
    """One POST as it arrived."""

    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Record POSTs to /hook; answer `statuses` in turn (then 200); stop and start on one port."""

    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered.append(status)
        if status < 300:
            self.got.append(Received(await request.read(), dict(request.headers)))
        return web.Response(status=status, text="ok")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def events(self) -> list[str]:
        return [r.json()["event"] for r in self.got]

    async def until(self, count: int) -> None:
        """Wait until `count` bodies arrived."""
        await until(lambda: len(self.got) >= count, f"{count} notification(s) arrive")
