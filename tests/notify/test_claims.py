"""The store decides which replica sends a notification: the first claimer, once."""

from __future__ import annotations

import asyncio
import time

from broker.store.api import NOTICE_DAYS, Store


async def test_only_the_first_claim_of_a_key_wins(any_store: Store) -> None:
    """Of many concurrent claims of one key exactly one is granted; another key is separate."""
    now = time.time()
    answers = await asyncio.gather(
        *(any_store.claim_notification("reauth_required:gen1", f"h{i}", now) for i in range(8))
    )
    assert sorted(answers) == [False] * 7 + [True]
    assert await any_store.claim_notification("recovered:gen2", "h1", now)
    assert not await any_store.claim_notification("recovered:gen2", "h1", now)


async def test_claims_older_than_the_retention_are_pruned(any_store: Store) -> None:
    """A claim past NOTICE_DAYS is forgotten, so the key can be claimed again."""
    old = time.time() - NOTICE_DAYS * 86400 - 10
    assert await any_store.claim_notification("blocked:gen1", "a", old)
    assert await any_store.claim_notification("other", "a", time.time())
    assert await any_store.claim_notification("blocked:gen1", "b", time.time())
