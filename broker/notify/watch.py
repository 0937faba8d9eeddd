"""Watch the running accounts: a snapshot a second, its transitions claimed, then queued.

The parts that change state (token manager, limiter) know nothing of notifications; this
polls what they already expose, which costs a few attribute reads per account. Before an
event is queued, the store must grant its key (`claim_notification`): with replicas on one
store, exactly one of them sends it. A store that cannot answer does not silence it: sending
twice is better than not at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from broker.config.model import Config
from broker.errors import StoreError
from broker.logs import get_logger, redactor
from broker.notify.deliver import Delivery
from broker.notify.detect import Event, Memory, Snapshot, detect
from broker.notify.message import body
from broker.server.routing import ACCOUNTS, Account
from broker.store.lease import holder_id

log = get_logger()

POLL_SECONDS = 1.0


def snapshot(account: Account) -> Snapshot:
    """Read what notifications care about from one running account."""
    manager = account.manager
    pair = manager.pair
    long_lived = pair is not None and pair.refresh_token is None
    return Snapshot(
        state=account.state,
        generation=manager.generation,
        reauth=manager.reauth_reason,
        last_error=manager.stats.store_error or manager.stats.last_error,
        store_degraded=manager.store_degraded,
        blocked=account.limiter.state == "blocked",
        failing=manager.refresh_failing,
        long_lived_expires_at=pair.expires_at if pair is not None and long_lived else None,
        refresh_obtained_at=(pair.refresh_obtained_at or pair.obtained_at)
        if pair is not None and not long_lived
        else None,
        base_url=manager.upstream.base_url if manager.upstream is not None else None,
    )


@dataclass
class Watcher:
    """Turn the accounts' transitions into claimed, queued notifications."""

    accounts: Mapping[str, Account]
    urls: Mapping[str, tuple[str, ...]]
    delivery: Delivery
    template: str | None = None
    failing_after: float = 3600.0
    default_urls: tuple[str, ...] = ()  # for accounts not in `urls` (added while serving)
    holder: str = field(default_factory=holder_id)
    memory: dict[str, Memory] = field(default_factory=dict)

    async def poll(self, now: float | None = None) -> list[Event]:
        """Look at every account once; return the events this process queued."""
        now = time.time() if now is None else now
        sent: list[Event] = []
        for name, account in list(self.accounts.items()):
            urls = self.urls.get(name, self.default_urls)  # an account added on SIGHUP: [notify]
            if not urls:
                continue
            before = self.memory.get(name, Memory())
            self.memory[name], events = detect(
                before, snapshot(account), name, now, failing_after=self.failing_after
            )
            for event in events:
                if await self._claim(account, event, now):
                    self.delivery.submit(
                        urls,
                        body(event, self.template),
                        event=event.event,
                        account=name,
                    )
                    sent.append(event)
        return sent

    async def _claim(self, account: Account, event: Event, now: float) -> bool:
        try:
            claimed = await account.manager.store.claim_notification(event.key, self.holder, now)
        except StoreError as exc:
            log.warning("notify_claim_failed", notice=event.event, error=exc.message)
            return True
        if not claimed:
            log.info("notify_claimed_elsewhere", notice=event.event, key=event.key)
        return claimed

    async def run(self, interval: float = POLL_SECONDS) -> None:
        """Poll until cancelled; an error in one round is logged and the next one goes on."""
        while True:
            try:
                await self.poll()
            except Exception:
                log.exception("notify_watch_error")
            await asyncio.sleep(interval)


def delivery_for(config: Config) -> Delivery:
    """A Delivery signing with the configured secret; the URLs and secret join the redactor."""
    secret = config.notify.secret.reveal() if config.notify.secret else None
    redactor.register(secret, *config.notify.urls, permanent=True)
    for account in config.accounts:
        redactor.register(*(account.notify_urls or ()), permanent=True)
    return Delivery(secret=secret)


def notifying(config: Config) -> Callable[[web.Application], AsyncIterator[None]] | None:
    """The cleanup context that watches the app's accounts, or None when nobody listens."""
    urls = {a.name: config.for_account(a.name).notify_urls for a in config.accounts}
    if not any(urls.values()):
        return None

    async def watching(app: web.Application) -> AsyncIterator[None]:
        accounts: dict[str, Account] = app[ACCOUNTS]
        async with delivery_for(config).running() as delivery:
            watcher = Watcher(
                accounts,
                urls,
                delivery,
                template=config.notify.template,
                failing_after=config.notify.refresh_failing_after,
                default_urls=config.notify.urls,
            )
            task = asyncio.create_task(watcher.run(), name="notify-watch")
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return watching
