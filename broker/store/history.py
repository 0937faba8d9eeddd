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
"""

from __future__ import annotations

from typing import Any

KEEP_ENTRIES = 10_000  # per account; the schemas' delete triggers embed the same number
COMPACT_BATCH = 100  # entries one append deletes at most
COUNT_COLUMNS = ("account", "outcome", "count")  # what `migrate-store` copies of the counters


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
