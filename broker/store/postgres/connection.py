"""Connect to PostgreSQL so that no store call can outlive its bound, even on a silent path.

A NAT or a load balancer that forgets an idle flow says nothing: no reset, no FIN. A query
sent into such a path is never seen by the server, so its statement_timeout cannot help; the
call would wait forever, holding the store's connection, while a granted pair waits to be
committed. Three layers, each a backstop for the one before:
- the server's own timeouts end what it does see: statement_timeout, lock_timeout (a row
  lock's wait; an account's advisory lock is only ever tried, pool.py) and
  idle_in_transaction_session_timeout, which frees the locks of a client that vanished
  mid-transaction;
- TCP keepalives and tcp_user_timeout let the kernel give up on a peer that stopped answering
  (the LISTEN connection, idle by design, only ever learns of a dead path this way);
- `Cutoff`: the client's own bound on each store call. When it passes, the connection's socket
  is shut down: the psycopg call waiting on it fails at once with an ordinary error, and the
  next call reconnects. Cancelling the task instead would make psycopg send a cancel request
  and wait for the query's end, up to ten seconds more, over the very path that went silent.

The server-side timeouts are derived from the one bound so they always fire first; any libpq
parameter (or `-c` option) given in the store URL wins over these defaults.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from contextlib import suppress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from broker.store.postgres.schema import SCHEMA

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

DEFAULT_TIMEOUT = 10.0  # seconds a store call may take, from its turn on the connection to its end
# The part of the bound a call may wait for a lock: the rest is for its statements.
LOCK_SHARE = 0.3
# Probe an idle connection after 10 s, every 5 s, 3 times: a dead path is noticed in ~25 s.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def conninfo(url: str, bound: float) -> str:
    """The libpq connection string for `url`: the broker's schema and timeouts, unless given."""
    given = conninfo_to_dict(url)
    defaults: dict[str, Any] = {
        **KEEPALIVES,
        # libpq counts whole seconds and takes at least 2; the caller's deadline is exact.
        "connect_timeout": max(2, math.ceil(bound / 2)),
        # Sent data unacknowledged this long: the kernel drops the connection.
        "tcp_user_timeout": _ms(bound),
        "application_name": "amo-broker",
    }
    server = (
        f"-c statement_timeout={_ms(bound / 2)} -c lock_timeout={_ms(bound * LOCK_SHARE)} "
        f"-c idle_in_transaction_session_timeout={_ms(bound * 2)}"
    )
    # A later -c wins: the URL's own options override the timeouts, never the schema.
    own = str(given.get("options") or "")
    options = " ".join(filter(None, (server, own, f"-c search_path={SCHEMA}")))
    params = {key: value for key, value in defaults.items() if key not in given}
    return make_conninfo(url, **params, options=options)


async def connect(url: str, bound: float = DEFAULT_TIMEOUT) -> Conn:
    """Open an autocommit connection in the broker's schema, within `bound` seconds."""
    async with asyncio.timeout(bound):
        return await psycopg.AsyncConnection.connect(conninfo(url, bound), autocommit=True)


class Cutoff:
    """Shut a connection's socket down if the call using it is not done within `seconds`.

    Shut down, not closed: the descriptor stays valid for the psycopg call parked on it,
    which wakes up to "server closed the connection" instead of waiting on.
    """

    def __init__(self, conn: Conn, seconds: float) -> None:
        self.fired = False
        self._conn = conn
        self._handle = asyncio.get_running_loop().call_later(max(seconds, 0.0), self._fire)

    def cancel(self) -> None:
        self._handle.cancel()

    def _fire(self) -> None:
        self.fired = True
        shut_down(self._conn)


def shut_down(conn: Conn) -> None:
    """End both directions of the connection's socket now, without a word to the server."""
    with suppress(psycopg.Error, OSError):
        # A duplicate descriptor: closing it leaves psycopg's own open.
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
