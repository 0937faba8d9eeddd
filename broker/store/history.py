"""The rotation history's retention and outcome counters, as both backends keep them.

Why this shape:
- The history is append-only for auditors, but a rotation loop can append hundreds of
  thousands of rows a day. So each account keeps its newest `KEEP_ENTRIES` entries (years of
  normal rotations: about one a day), and every append deletes the oldest entries beyond that
  bound in its own transaction, at most `COMPACT_BATCH` of them, so no append ever pays for
  a backlog (an upgraded store with a huge history shrinks a batch per append).
- No age bound: a quiet account keeps its whole story, however old; the row bound alone caps
  the size, whatever the rate.
- `rotation_counts` (account, outcome, count, kept) is kept by triggers on `rotations`, so
  every append, by any path, is counted in the same transaction: `count` is every entry ever
  appended (compaction does not lower it), `kept` how many the history still holds. /status
  and `amo-broker status` read `count` by primary key instead of scanning the history.
- The delete trigger lets through only what compaction does: the oldest entry of an account
  holding more than `KEEP_ENTRIES` (both found through the (account, id) index and the
  account's `kept` sums, in O(log n)). UPDATE, TRUNCATE and any other DELETE stay refused,
  so the newest entries of every account cannot be edited or removed.
- Compaction deletes one entry per statement, oldest first: the trigger's "the oldest of its
  account" check then holds whatever order a backend would process a multi-row DELETE in.
- Compaction must not forget which refresh tokens were spent (an import of one would put a
  dead token over the live pair): `spent_tokens` (account, fingerprint, spent_at) is kept by
  a trigger on `rotations`, apart from the history, so it outlives the entries compaction
  deletes. An entry is a rotation's old refresh token (not when amoCRM kept it: old = new),
  or a refused one (`rejected`). Imports, re-keys and transient failures spend nothing. It is
  pruned after `SPENT_DAYS`: a token spent that long ago was issued earlier still, past the
  three months amoCRM's refresh tokens live, so it is dead whatever the store says. `was_spent`
  reads it by primary key, and also calls the stored token spent while a persisted
  `reauth_required` is about it (a refusal or a revocation whose history row is missing).
"""

from __future__ import annotations

from typing import Any

KEEP_ENTRIES = 10_000  # per account; the schemas' delete triggers embed the same number
COMPACT_BATCH = 100  # entries one append deletes at most
COUNT_COLUMNS = ("account", "outcome", "count")  # what `migrate-store` copies of the counters
# How long a spent refresh token is remembered (amoCRM's refresh tokens live three months);
# the schemas' spent triggers embed it in seconds (7948800), as they embed KEEP_ENTRIES.
SPENT_DAYS = 92
SPENT_COLUMNS = ("account", "fingerprint", "spent_at")
# Whether the account's refresh token with the given fingerprint is spent: params (account,
# fingerprint, account, fingerprint); `?` is the backend's placeholder.
WAS_SPENT = (
    "SELECT 1 FROM spent_tokens WHERE account = ? AND fingerprint = ? "
    "UNION ALL SELECT 1 FROM tokens t JOIN account_state s ON s.account = t.account "
    "WHERE t.account = ? AND t.refresh_fp = ? AND s.state = 'reauth_required' "
    "AND s.generation >= t.generation"
)


async def compact(db: Any, account: str, mark: str) -> int:
    """Delete `account`'s oldest entries beyond the newest KEEP_ENTRIES; return how many.

    Call inside the transaction that appended; `mark` is the backend's parameter mark.
    """
    cursor = await db.execute(
        "SELECT COALESCE(SUM(kept), 0) FROM rotation_counts WHERE account = ?".replace("?", mark),
        (account,),
    )
    row = await cursor.fetchone()
    await cursor.close()
    excess = min(int(row[0]) - KEEP_ENTRIES, COMPACT_BATCH)
    for _ in range(excess):
        await db.execute(
            "DELETE FROM rotations WHERE id = "
            "(SELECT MIN(id) FROM rotations WHERE account = ?)".replace("?", mark),
            (account,),
        )
    return max(excess, 0)


async def append(
    db: Any, account: str, head: tuple[Any, ...], tail: tuple[Any, ...], mark: str
) -> None:
    """Append one history entry (its counter follows by trigger), then apply retention.

    `mark` is the backend's placeholder (`?` or `%s`): the statements are otherwise the same.
    """
    values = ", ".join([mark] * 8)
    columns = "account, at, reason, generation, old_fingerprint, new_fingerprint, outcome, error"
    statement = f"INSERT INTO rotations ({columns}) VALUES ({values})"  # noqa: S608 -- constants
    await db.execute(statement, (account, *head, *tail))
    await compact(db, account, mark)
