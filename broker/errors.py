"""Errors the broker raises on purpose, each with a stable code, an HTTP status and an exit code.

    BrokerError                   code                        HTTP  exit
    ├── ConfigError               config_error                500   2   a setting is wrong
    ├── StoreError                store_error                 503   2   the store is unusable
    │   ├── StoreLockedError      store_locked                503   2   a ciphertext won't open
    │   └── PairRescuedError      pair_rescued                503   3   a granted pair is in a
    │                                                                   rescue file, not stored
    ├── StaleWriteError           stale_write                 503   2   the row moved past us
    ├── NoTokensError             no_tokens                   503   2   nothing imported yet
    ├── ImportRefusedError        import_refused              409   4   a spent token, or a live
    │                                                                   pair it would replace
    ├── ReauthRequiredError       reauth_required             503   2   a person must re-authorise
    ├── TokenEndpointError        token_endpoint_unavailable  503   2   5xx, timeout, refused
    │   └── GrantRejectedError    grant_rejected              503   2   400/401 from the endpoint
    ├── RequestRejected           (per instance)              4xx   1   the proxy refuses a call
    ├── UpstreamError             bad_gateway                 502   1   amoCRM unreachable
    │   └── UpstreamTimeout       gateway_timeout             504   1   amoCRM too slow
    ├── RateLimited               rate_limited                503   1   over the account's pace
    ├── Overloaded                overloaded                  503   1   waiting bodies over budget
    └── AccountBlocked            account_blocked             503   1   amoCRM blocked the account

Messages never carry a token or secret: they are shown to callers and printed on the terminal.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500
    exit_code: int = 2

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def to_json(self) -> dict[str, str]:
        """Return the JSON error body a caller sees."""
        return {"error": self.code, "message": self.message}


class ConfigError(BrokerError):
    """A setting is missing, malformed or contradicts another."""

    code = "config_error"


class StoreError(BrokerError):
    """The store cannot be opened, read or written."""

    code = "store_error"
    http_status = 503


class StoreLockedError(StoreError):
    """A ciphertext in the store does not open with the configured key."""

    code = "store_locked"


class PairRescuedError(StoreError):
    """The store never took a pair amoCRM granted: it is sealed in a rescue file instead.

    The old refresh token is spent, so that file holds the only working pair; the message says
    where, and the command that puts it into the store (`amo-broker import --rescued PATH`).
    """

    code = "pair_rescued"
    exit_code = 3


class StaleWriteError(BrokerError):
    """A compare-and-swap write found the pair's row at another generation than expected.

    Not a StoreError: the store works, another writer (a replica's rotation, a person's import)
    got there first. The writer reads the row and decides (adopt it, or write over its own
    ancestor); treating it as a failing store would keep a superseded pair in memory.
    """

    code = "stale_write"
    http_status = 503

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"the pair's row is at generation {current}, not {expected}")
        self.expected = expected
        self.current = current


class NoTokensError(BrokerError):
    """The store holds no token pair yet: run `amo-broker import` or `exchange-code`."""

    code = "no_tokens"
    http_status = 503


class ImportRefusedError(BrokerError):
    """An import that would kill the account: a refresh token the store knows as spent, or a
    newer live pair it would replace without `--replace`, or a stale rescue file."""

    code = "import_refused"
    http_status = 409
    exit_code = 4


class ReauthRequiredError(BrokerError):
    """amoCRM rejected the refresh grant; only a person can re-authorise the integration."""

    code = "reauth_required"
    http_status = 503


class TokenEndpointError(BrokerError):
    """The token endpoint failed in a way that may heal by itself."""

    code = "token_endpoint_unavailable"
    http_status = 503

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status


class GrantRejectedError(TokenEndpointError):
    """The token endpoint refused the grant (400/401): the token or the client is not accepted."""

    code = "grant_rejected"


class RequestRejected(BrokerError):
    """A caller's request that the proxy refuses before anything goes upstream."""

    exit_code = 1

    def __init__(self, code: str, message: str, http_status: int) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class UpstreamError(BrokerError):
    """amoCRM could not be reached or broke the connection."""

    code = "bad_gateway"
    http_status = 502
    exit_code = 1


class UpstreamTimeout(UpstreamError):
    """amoCRM did not answer within the proxy timeout."""

    code = "gateway_timeout"
    http_status = 504


class RateLimited(BrokerError):
    """The account's request queue is full: come back after `retry_after` seconds."""

    code = "rate_limited"
    http_status = 503
    exit_code = 1


class Overloaded(BrokerError):
    """The bodies of the calls waiting here fill the memory budget: come back shortly."""

    code = "overloaded"
    http_status = 503
    exit_code = 1


class AccountBlocked(BrokerError):
    """amoCRM has blocked the account (403s): nothing is sent until the cool-down ends."""

    code = "account_blocked"
    http_status = 503
    exit_code = 1
