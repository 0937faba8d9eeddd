"""Open what a command needs (store, HTTP session, token manager) and run the server.

`serve`, `demo`, `refresh` and the tests all come through here, so they share one wiring.
How the server listens, takes signals and stops is in broker/lifecycle.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import http_parser, web

from broker.config.model import Config
from broker.errors import BrokerError, ConfigError
from broker.lifecycle import (
    InFlight,
    Signals,
    drain,
    listen,
    make_runner,
    raise_open_files_limit,
)
from broker.logs import get_logger, redactor
from broker.notify.watch import notifying
from broker.server.accounts import UPSTREAM_CONNECTIONS, add_account, remove_account
from broker.server.app import create_app
from broker.server.call import WriteTellingRequest
from broker.server.clients import ClientRegistry
from broker.server.oauth_callback import make_callback_handler
from broker.server.own_calls import paced_probe
from broker.server.revoke_hook import make_revoke_handler
from broker.server.routing import AccountSetup
from broker.store.api import Store
from broker.store.opener import open_store
from broker.tokens.endpoint import OAuthClient
from broker.tokens.importing import bootstrap_from_env
from broker.tokens.landing import SETTLE_SECONDS, Departures, Landing, rescue_error
from broker.tokens.long_lived import account_manager
from broker.tokens.manager import TokenManager
from broker.tokens.upstream import Upstream
from broker.traffic.limiter import AccountLimiter

if TYPE_CHECKING:
    pass

log = get_logger()


def new_session() -> aiohttp.ClientSession:
    """One pooled session for every call to amoCRM.

    No cookie jar: cookies amoCRM sets must never ride along on other callers' requests.
    """
    return aiohttp.ClientSession(
        # No limit of the session's own: each account's queue bounds its connections
        # (UPSTREAM_CONNECTIONS), and counts every caller waiting for one; a process-wide cap
        # would make one account's calls wait, uncounted, behind another's.
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar(),
        # Send only what the caller sent: no aiohttp defaults in its name.
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        # Tells when each proxied request is written: the pace is kept at amoCRM's side by it.
        request_class=WriteTellingRequest,
    )


@dataclass
class AccountRuntime:
    """One account's open parts: its view of the config, store, OAuth client and manager,
    and its pace (the limiter every call to its /api/v4 waits in, the broker's own too)."""

    config: Config
    store: Store
    oauth: OAuthClient | None
    manager: TokenManager
    limiter: AccountLimiter

    def setup(self) -> AccountSetup:
        """What create_app needs of this account to serve it."""
        config = self.config
        return AccountSetup(
            config.account, self.manager, _base_url(config), config.limits, self.limiter
        )

    @property
    def landing(self) -> Landing:
        """Its manager, and where a pair the store never takes is sealed."""
        return Landing(self.manager, self.config.rescue_directory, self.store.location)


@dataclass
class Runtime:
    """The default account's parts (as before accounts), the session, and every account."""

    store: Store
    session: aiohttp.ClientSession
    oauth: OAuthClient | None
    manager: TokenManager
    accounts: dict[str, AccountRuntime]
    # Accounts removed while serving, still landing what their store lacks (reload_accounts).
    leaving: Departures = field(default_factory=lambda: Departures())


@asynccontextmanager
async def open_runtime(
    config: Config, *, need_oauth: bool = True, every_account: bool = False
) -> AsyncIterator[Runtime]:
    """Open the session and the configured account's store, OAuth client and manager.

    `every_account` opens all of `[[accounts]]` (serve); commands act on one account. Every
    account shares the one store connection (SQLite) or pool (PostgreSQL) opened here, and
    they are opened side by side: start-up does not grow with a round trip per account.

    Before the store closes, every refresh in flight lands, and so does every pair the store
    still lacks (for SETTLE_SECONDS); one that does not is sealed in a rescue file, and
    PairRescuedError (exit 3) says which and what to run, once the store is closed.
    """
    names = [a.name for a in config.accounts] if every_account else []
    names = names or [config.account]
    async with new_session() as session, open_store(config) as store:
        views = {
            name: store if name == store.account else store.for_account(name) for name in names
        }
        opened = await asyncio.gather(
            *(
                open_account(config.for_account(name), session, view, need_oauth=need_oauth)
                for name, view in views.items()
            )
        )
        accounts = {account.config.account: account for account in opened}
        main = accounts[config.account]
        runtime = Runtime(main.store, session, main.oauth, main.manager, accounts)
        try:
            yield runtime
        finally:
            landings = (account.landing for account in runtime.accounts.values())
            unlanded = await runtime.leaving.land_all(landings, SETTLE_SECONDS)
    if unlanded:
        raise rescue_error(unlanded)


async def open_account(
    config: Config, session: aiohttp.ClientSession, store: Store, *, need_oauth: bool = True
) -> AccountRuntime:
    """Set up one account over its view of the store: its upstream, OAuth client and manager."""
    long_lived = config.long_lived_token
    try:
        oauth_config = config.require_oauth() if need_oauth and long_lived is None else None
    except ConfigError as exc:
        if not config.accounts:
            raise
        # Among a thousand [[accounts]], say which one lacks it.
        raise ConfigError(f"[[accounts]] {config.account}: {exc.message}") from None
    if config.client_secret is not None:
        redactor.register(config.client_secret.reveal(), permanent=True)
    upstream = Upstream(config.base_url, store) if config.base_url is not None else None
    if upstream is not None:
        await upstream.load()  # a renamed subdomain, stored, wins over the configured one
    oauth = (
        OAuthClient(session, oauth_config, config.refresh_timeout, upstream)
        if oauth_config
        else None
    )
    # Built here, before the app, so that the manager's own calls to /api/v4 (the probe) wait
    # in the same pace as the proxied calls: amoCRM counts them alike (broker/server/own_calls.py).
    limiter = AccountLimiter(config.limits, connections=UPSTREAM_CONNECTIONS)
    # The proxy's own session: the probe reaches amoCRM as the calls it checks do.
    probe = paced_probe(session, upstream, limiter, config.upstream_timeout) if upstream else None
    manager = await account_manager(
        store,
        oauth,
        margin=config.margin_seconds,
        probe=probe,
        long_lived=long_lived.reveal() if long_lived is not None else None,
        now=time.time(),
    )
    manager.upstream = upstream
    await manager.load()
    return AccountRuntime(config, store, oauth, manager, limiter)


def build_app(
    runtime: Runtime,
    config: Config,
    *,
    proactive: bool = True,
    clients: ClientRegistry | None = None,
) -> web.Application:
    """The broker's application over an opened runtime: every account it opened."""
    others = [
        account.setup() for name, account in runtime.accounts.items() if name != config.account
    ]
    callback = None
    if config.oauth_callback:
        callback = make_callback_handler(
            lambda name: (runtime.accounts[name].config, runtime.accounts[name].manager),
            runtime.session,
            refresh_timeout=config.refresh_timeout,
            states=runtime.store,
        )
    revoke = None
    if config.revoke_hook:
        revoke = make_revoke_handler(
            lambda name: (runtime.accounts[name].config, runtime.accounts[name].manager),
            config.account,
        )
    app = create_app(
        runtime.manager,
        runtime.session,
        base_url=_base_url(config),
        upstream_timeout=config.upstream_timeout,
        max_body_bytes=config.max_body_bytes,
        max_buffered_bytes=config.max_buffered_bytes,
        proactive=proactive,
        clients=clients,
        limits=config.limits,
        limiter=runtime.accounts[config.account].limiter,
        account=config.account,
        others=others,
        callback=callback,
        public_url=config.public_url,
        revoke_hook=revoke,
    )
    watching = notifying(config)
    if watching is not None:  # operators hear of state changes (broker/notify/)
        app.cleanup_ctx.append(watching)
    return app


def _base_url(config: Config) -> str:
    if config.base_url is None:
        raise ConfigError(f"account {config.account}: no base_url (AMOCRM_BASE_URL)")
    return config.base_url


def require_c_parser() -> None:
    """Refuse to serve on aiohttp's pure-Python HTTP parser.

    The C parser (llhttp) is the one hardened against request smuggling: it refuses
    Content-Length with Transfer-Encoding, duplicate lengths and obs-fold. The Python fallback
    has had its own parsing CVEs, and a broker that holds a CRM's keys must not run on it.
    """
    if http_parser.HttpRequestParser.__module__ != "aiohttp._http_parser":
        raise ConfigError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or aiohttp "
            "built without extensions): reinstall aiohttp from a binary wheel"
        )


def caller_registry(config: Config, *, insecure_no_client_auth: bool) -> ClientRegistry | None:
    """Load caller credentials; refuse to serve beyond this host without them."""
    if config.client_tokens_file is not None:
        return ClientRegistry(config.client_tokens_file)
    if not config.loopback_only and not insecure_no_client_auth:
        raise ConfigError(
            f"refusing to listen on {config.host} without caller credentials: anyone who can "
            "reach it could act as your integration. Set BROKER_CLIENT_TOKENS_FILE "
            "(`amo-broker client add NAME`), use BROKER_UNIX_SOCKET, or pass "
            "--insecure-no-client-auth if the network itself is the boundary"
        )
    return None


async def serve(
    config: Config,
    *,
    on_ready: Callable[[str], None] | None = None,
    proactive: bool = True,
    insecure_no_client_auth: bool = False,
    reload: Callable[[], Config] | None = None,
) -> int:
    """Run the broker until SIGTERM or SIGINT, then drain and stop; return the exit code.

    On SIGHUP, `reload` reads the configuration again, and the accounts it adds or removes
    join or leave (reload_accounts); nothing else changes without a restart. A granted pair
    the store never took by the stop raises PairRescuedError (exit 3) after its rescue.
    """
    require_c_parser()
    raise_open_files_limit()
    clients = caller_registry(config, insecure_no_client_auth=insecure_no_client_auth)
    with Signals() as signals:
        async with open_runtime(config, every_account=True) as runtime:
            await bootstrap_from_env(config, runtime.store, time.time())
            await runtime.manager.load()
            app = build_app(runtime, config, proactive=proactive, clients=clients)
            in_flight = InFlight()
            app.middlewares.insert(0, in_flight.middleware)
            runner = make_runner(app)
            await runner.setup()
            try:
                url = await listen(runner, config)
                log.info(
                    "listening",
                    url=url,
                    caller_auth=clients is not None,
                    state=runtime.manager.state,
                    generation=runtime.manager.generation,
                )
                if on_ready is not None:
                    on_ready(url)
                settings = account_settings(config)
                while not await signals.stop_or_reload():
                    if reload is None:
                        log.warning("sighup_ignored", message="this server cannot reload")
                        continue
                    await reload_accounts(runtime, app, reload, settings)
            except BaseException:
                await runner.cleanup()
                raise
            await drain(runner, in_flight, signals)
            if any(a.manager.state == "refreshing" for a in runtime.accounts.values()):
                log.info(
                    "stopping_after_refresh",
                    message="a token refresh is in flight: waiting until amoCRM's answer is "
                    "stored before closing the store",
                )
        # open_runtime has waited for any refresh in flight and closed the store.
        log.info("stopped")
    return 0


def account_settings(config: Config) -> dict[str, object]:
    """Each served account's settings as configured (without [[accounts]]: the one account,
    whose settings need a restart to change)."""
    return {a.name: a for a in config.accounts} or {config.account: None}


async def reload_accounts(
    runtime: Runtime,
    app: web.Application,
    load: Callable[[], Config],
    settings: dict[str, object],
) -> None:
    """Serve the accounts the configuration names now: open the new, drop the gone ones.

    The others are not touched: their connections, queues, leases and refreshes go on. A
    configuration that does not load changes nothing. An account whose settings changed keeps
    the ones it was opened with until a restart (`restart_needed` names it): swapping its
    client or limits under calls in flight is not worth the risk. `settings` (what each
    served account was opened with) is kept up to date here.
    """
    try:
        config = load()
    except ConfigError as exc:
        log.error("reload_failed", error=exc.message, message="nothing changed")
        return
    default = runtime.store.account
    wanted = account_settings(config)
    if default not in wanted:
        log.error(
            "reload_failed",
            error=f"the default account {default} cannot leave while serving: restart to change it",
            message="nothing changed",
        )
        return
    added = [name for name in wanted if name not in runtime.accounts]
    removed = [name for name in runtime.accounts if name not in wanted]
    changed = [name for name in wanted if name in settings and wanted[name] != settings[name]]
    joined = await asyncio.gather(
        *(_join(runtime, app, config.for_account(name)) for name in added)
    )
    added = [name for name, ok in zip(added, joined, strict=True) if ok]
    settings.update({name: wanted[name] for name in added})
    for name in removed:
        await remove_account(app, name)
        settings.pop(name, None)
        # New calls get 404 now; its refresh in flight and any pair the store lacks land in
        # the background, for as long as its lease lasts, else go to a rescue file.
        account = runtime.accounts.pop(name)
        runtime.leaving.start(account.landing, account.manager.lease_seconds)
    log.info(
        "accounts_reloaded",
        added=added,
        removed=removed,
        accounts=len(runtime.accounts),
        restart_needed=changed,
    )


async def _join(runtime: Runtime, app: web.Application, config: Config) -> bool:
    """Open one added account on the shared store and serve it; log why not, if not."""
    try:
        store = runtime.store.for_account(config.account)
        account = await open_account(config, runtime.session, store)
        setup = account.setup()
    except BrokerError as exc:
        log.error("account_add_failed", account=config.account, error=exc.message)
        return False
    except Exception:  # a defect must not take the other accounts down with the server
        log.exception("account_add_failed", account=config.account)
        return False
    runtime.accounts[config.account] = account
    add_account(app, setup)
    return True
