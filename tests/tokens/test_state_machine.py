"""Random sequences over the token lifecycle keep the broker's promises, with real parts only.

The sandbox amoCRM serves on a loopback port, one SQLite store file is shared, and two
"processes" (a TokenManager each, with its own store connection, OAuth client, clock and
lease-holder pid) make requests the way the proxy does, tick, refresh by hand, crash and
restart, while amoCRM expires access tokens, revokes the grant and has token endpoint outages.
Hypothesis stateful tests are synchronous, so one `asyncio.Runner` per run owns the event loop
and every rule runs its coroutine on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiosqlite
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, currently_in_test_context, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.config.model import OAuthClientConfig, Secret
from broker.errors import BrokerError, GrantRejectedError
from broker.pair import TokenPair, fingerprint, refresh_due_at
from broker.sandbox.server import Sandbox, start_sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import AccountState, TokenStore
from broker.tokens.endpoint import OAuthClient, parse_token_answer
from broker.tokens.manager import TokenManager
from broker.tokens.probe import account_probe

T = TypeVar("T")

ACCESS_TTL = 3600  # short, so a run of 30 steps sees many expiries but no 90-day refresh expiry
MARGIN = 600.0
LEADS = "/api/v4/leads"
PROCS = st.sampled_from([0, 1])
HOST = os.uname().nodename


def _note(message: str) -> None:
    """Note for Hypothesis's report; the plain replays below run outside its test context."""
    if currently_in_test_context():
        note(message)


class World:
    """Wall time shared by amoCRM and every process (one host, one clock), moved by the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += max(seconds, 0.0)


class ProcessClock:
    """One process's clock: the world's wall time, and a monotonic clock of its own origin."""

    def __init__(self, world: World, origin: float) -> None:
        self._world = world
        self._origin = origin

    def time(self) -> float:
        return self._world.time()

    def monotonic(self) -> float:
        return time.monotonic() + self._world.offset + self._origin


class ProcessKilled(Exception):
    """The simulated process died here (the rule that armed the crash expects it)."""


class RecordingRefresher:
    """A process's OAuthClient: note every pair amoCRM issues and refusal; die at an armed point.

    It also notes, at the moment of each call, whether `reauth_required` was already
    persisted: the manager calls it only while holding the lease, so this is exactly "a
    process spent a token after the store said nobody may".
    """

    def __init__(
        self,
        inner: OAuthClient,
        observer: Callable[[], Awaitable[AccountState | None]],
        issued: Callable[[str], None],
        refused: Callable[[], None],
    ) -> None:
        self._inner = inner
        self._observer = observer
        self._issued = issued
        self._refused = refused
        self.timeout_seconds = inner.timeout_seconds
        self.manual = False  # set by the rule while an operator's `amo-broker refresh` runs
        self.crash_at: str | None = None  # "after_lease" or "after_answer"
        self.crash: Callable[[], Awaitable[None]] | None = None
        self.died = False
        self.calls_after_reauth = 0

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        state = await self._observer()
        if state is not None and state.state == "reauth_required" and not self.manual:
            self.calls_after_reauth += 1
        if self.crash_at == "after_lease":
            await self._die()
        try:
            fresh = await self._inner.refresh(refresh_token, now=now)
        except GrantRejectedError:
            if not self.manual:
                self._refused()
            raise
        assert fresh.refresh_token is not None  # the sandbox always sends one
        self._issued(fresh.refresh_token)
        if self.crash_at == "after_answer":
            await self._die()
        return fresh

    async def _die(self) -> None:
        self.died = True
        assert self.crash is not None
        await self.crash()  # nothing this process does after this point reaches the store
        raise ProcessKilled


class SlowDiskStore(TokenStore):
    """The real store on a slow disk: each write returns `write_delay` s after its commit."""

    write_delay = 0.0

    @asynccontextmanager
    async def transaction(
        self, extra: float = 0.0, *, urgent: bool = False
    ) -> AsyncIterator[aiosqlite.Connection]:
        async with super().transaction(extra, urgent=urgent) as db:
            yield db
        if self.write_delay:
            await asyncio.sleep(self.write_delay)


@dataclass
class Process:
    """One broker process: its manager, store connection, OAuth client and lease-holder pid."""

    name: str
    manager: TokenManager
    store: SlowDiskStore
    refresher: RecordingRefresher
    pid: subprocess.Popen[bytes]


def start_pid() -> subprocess.Popen[bytes]:
    """Start a process to stand for one broker process's pid (quick to start and to kill)."""
    devnull = subprocess.DEVNULL
    return subprocess.Popen(["sleep", "600"], stdin=devnull, stdout=devnull, stderr=devnull)


def kill_pid(pid: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process that stands for a broker's pid, so its lease reads as orphaned."""
    if pid.poll() is None:
        pid.kill()
    pid.wait()


@dataclass(frozen=True)
class Observation:
    """What the store and amoCRM say between two steps (fingerprints only, never tokens)."""

    generation: int
    state: AccountState | None
    refresh_fp: str | None
    refresh_live: bool
    token_calls: int
    refresh_calls: int
    rejected_calls: int
    doomed: str | None


class TokenLifecycle(RuleBasedStateMachine):
    """Two broker processes on one store against the sandbox, driven step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.dir = Path(tempfile.mkdtemp(prefix="amo-broker-sm-"))
        self.world = World()
        self.sandbox = Sandbox(access_ttl=ACCESS_TTL, clock=self.world.time)
        self.sealer = Sealer(os.urandom(32))
        self.procs: list[Process] = []
        self.pids: list[subprocess.Popen[bytes]] = []
        self.spawned = 0
        self.http: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.observer: TokenStore | None = None
        # The model: what amoCRM last issued to us, and why the grant may be beyond saving.
        self.newest_fp = ""
        self.doomed: str | None = None  # "revoked" or "lost answer" until a re-import
        self.lost_answers = 0
        self.reimports = 0
        self.refused = 0  # refused grants, an operator's manual refresh aside
        self.refused_at_doom = 0
        self.calls_after_reauth_by_dead = 0
        try:
            self.runner.run(self._start())
            self.snapshot = self.runner.run(self._observe())
        except BaseException:
            self.teardown()  # Hypothesis calls it only for a machine that was built
            raise

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.dir / "broker.db"

    async def _start(self) -> None:
        self.http, self.url = await start_sandbox(self.sandbox)
        self.session = aiohttp.ClientSession()
        self.observer = await TokenStore.open(self.path, self.sealer)  # the operator's CLI
        pair = self._fresh_pair()
        await self.observer.store_pair(pair, reason="import", outcome="imported")
        self.procs = [await self._spawn(0), await self._spawn(1)]

    def _fresh_pair(self) -> TokenPair:
        """A pair from amoCRM's consent flow (what `import` / `exchange-code` would store)."""
        answer = json.dumps(self.sandbox.issue_pair()).encode()
        pair = parse_token_answer(200, answer, now=self.world.time(), previous_refresh=None)
        assert pair.refresh_token is not None
        self.newest_fp = fingerprint(pair.refresh_token)
        return pair

    def _issued(self, refresh_token: str) -> None:
        self.newest_fp = fingerprint(refresh_token)

    def _refused(self) -> None:
        self.refused += 1

    def _doom(self, cause: str | None) -> None:
        """Note that the stored grant can no longer work (None: a new pair made it whole)."""
        self.doomed = cause
        self.refused_at_doom = self.refused

    async def _spawn(self, slot: int) -> Process:
        """Start a broker process: open the store, build the client, load what is stored."""
        assert self.session is not None and self.observer is not None
        self.spawned += 1
        store = await SlowDiskStore.open(self.path, self.sealer)
        assert isinstance(store, SlowDiskStore)
        client = OAuthClientConfig(
            self.url,
            self.sandbox.client_id,
            Secret(self.sandbox.client_secret),
            self.sandbox.redirect_uri,
        )
        oauth = OAuthClient(self.session, client, timeout=5)
        refresher = RecordingRefresher(oauth, self.observer.state, self._issued, self._refused)
        clock = ProcessClock(self.world, origin=self.spawned * 100_000.0)
        # As `serve` wires it: a 401 soon after a rotation is confirmed with a probe.
        probe = account_probe(self.session, self.url, 5)
        manager = TokenManager(store, refresher, margin=MARGIN, clock=clock, probe=probe)
        pid = start_pid()
        self.pids.append(pid)
        # All "processes" share this test's pid, so each lease holder is named after a child
        # process of its own instead: killing it makes the real `is_alive` see a dead holder.
        manager._holder = f"{HOST}:{pid.pid}:{secrets.token_hex(4)}"
        await manager.load()
        return Process(f"p{slot} (start #{self.spawned})", manager, store, refresher, pid)

    async def _observe(self) -> Observation:
        assert self.observer is not None
        stored = await self.observer.load()
        token = stored.pair.refresh_token if stored else None
        return Observation(
            generation=stored.generation if stored else 0,
            state=await self.observer.state(),
            refresh_fp=fingerprint(token) if token else None,
            refresh_live=token is not None and self.sandbox.is_refresh_token_live(token),
            token_calls=self.sandbox.token_calls,
            refresh_calls=self.sandbox.refresh_calls,
            rejected_calls=self.sandbox.rejected_refresh_calls,
            doomed=self.doomed,
        )

    def _attempt(self, what: str, coro: Coroutine[Any, Any, T]) -> T | BrokerError:
        """Run one step's coroutine; the broker's own errors are outcomes, not failures."""
        try:
            return self.runner.run(coro)
        except BrokerError as exc:
            _note(f"{what}: {type(exc).__name__}: {exc.message}")
            return exc

    def teardown(self) -> None:
        try:
            self.runner.run(self._stop())
        finally:
            for pid in self.pids:
                kill_pid(pid)
            self.runner.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _stop(self) -> None:
        for proc in self.procs:
            await proc.manager.wait_idle()
            await proc.store.close()
        if self.observer is not None:
            await self.observer.close()
        if self.session is not None:
            await self.session.close()
        if self.http is not None:
            await self.http.cleanup()

    async def _restart(self, index: int) -> None:
        """Replace a dead process with a fresh one that starts from the store."""
        old = self.procs[index]
        self.calls_after_reauth_by_dead += old.refresher.calls_after_reauth
        self.procs[index] = await self._spawn(index)
        _note(f"{old.name} died; {self.procs[index].name} started in its place")

    # -- what callers and amoCRM do -----------------------------------------------------------

    async def _get_leads(self, token: str) -> int:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.get(self.url + LEADS, headers=headers) as response:
            await response.read()
            return response.status

    async def _request(self, manager: TokenManager) -> int:
        """Do what the proxy does: send with the token; on a 401, refresh and replay once."""
        token, generation = await manager.token()
        status = await self._get_leads(token)
        if status != 401:
            return status
        await manager.unauthorized(generation)
        token, _ = await manager.token()
        return await self._get_leads(token)

    @rule(p=PROCS)
    def request(self, p: int) -> None:
        manager = self.procs[p].manager
        retry_at = manager.stats.next_attempt_at
        # When nothing stands in the way, a request must succeed: a 401 costs one refresh
        # of the current generation and one replay, and the replay's token works.
        healthy = (
            self.sandbox.token_fail_status is None
            and self.doomed is None
            and self.snapshot.state is None
            and manager.state == "ok"
            and manager.generation == self.snapshot.generation
            and (retry_at is None or retry_at <= self.world.time())
        )
        outcome = self._attempt(f"request via p{p}", self._request(manager))
        _note(f"request via p{p}: {outcome if isinstance(outcome, int) else 'error'}")
        if healthy:
            assert outcome in (200, 204), f"a healthy process's request ended in {outcome!r}"

    @rule()
    def access_tokens_expire(self) -> None:
        self.sandbox.expire_access_tokens()

    @rule(p=PROCS)
    def time_passes_refresh_margin_then_tick(self, p: int) -> None:
        manager = self.procs[p].manager
        if manager.pair is not None:
            due = refresh_due_at(manager.pair, MARGIN) + 1
            self.world.advance(due - self.world.time())
        self._attempt(f"tick of p{p}", manager.tick())

    @rule(p=PROCS)
    def loop_wakes_up(self, p: int) -> None:
        self.world.advance(5)  # the poll interval
        self._attempt(f"tick of p{p}", self.procs[p].manager.tick())

    @rule(seconds=st.sampled_from([2.0, 60.0, 400.0]))
    def time_passes(self, seconds: float) -> None:
        self.world.advance(seconds)

    @rule(p=PROCS)
    def manual_refresh(self, p: int) -> None:
        proc = self.procs[p]
        proc.refresher.manual = True
        try:
            self._attempt(f"manual refresh via p{p}", proc.manager.refresh("manual"))
        finally:
            proc.refresher.manual = False

    @rule(slow_disk=st.booleans())
    def both_processes_meet_a_401(self, slow_disk: bool) -> None:
        """Both processes get a 401 at once for their current generation.

        On a slow disk each write takes longer than one lease poll, so the process waiting
        for the lease sees every gap between the holder's writes.
        """
        a, b = (proc.manager for proc in self.procs)

        async def both() -> None:
            results = await asyncio.gather(
                a.unauthorized(a.generation), b.unauthorized(b.generation), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, BrokerError):
                    raise result
                if isinstance(result, BrokerError):
                    _note(f"concurrent 401: {type(result).__name__}: {result.message}")

        self.sandbox.token_delay = 0.02  # long enough for the two to overlap
        for proc in self.procs:
            proc.store.write_delay = 0.06 if slow_disk else 0.0
        try:
            self._attempt("concurrent 401", both())
        finally:
            self.sandbox.token_delay = 0.0
            for proc in self.procs:
                proc.store.write_delay = 0.0

    @rule()
    def grant_revoked(self) -> None:
        self.sandbox.revoke_refresh_tokens()
        self._doom("revoked")

    @rule()
    def token_endpoint_down(self) -> None:
        self.sandbox.token_fail_status = 503

    @rule()
    def token_endpoint_up(self) -> None:
        self.sandbox.token_fail_status = None

    @rule()
    def operator_reimports(self) -> None:
        """A person re-authorises: `amo-broker import` stores a fresh pair from consent."""
        assert self.observer is not None
        pair = self._fresh_pair()
        self.runner.run(self.observer.store_pair(pair, reason="import", outcome="imported"))
        self.reimports += 1
        self._doom(None)

    @rule(p=PROCS)
    def kill_and_restart(self, p: int) -> None:
        """kill -9 between requests: nothing is waited for, the next process reads the store."""
        proc = self.procs[p]
        kill_pid(proc.pid)
        self.runner.run(proc.store.close())
        self.runner.run(self._restart(p))

    @rule(
        p=PROCS,
        point=st.sampled_from(["after_lease", "after_answer"]),
        how=st.sampled_from(["manual", "unauthorized"]),
    )
    def crash_during_refresh(self, p: int, point: str, how: str) -> None:
        """kill -9 inside a refresh: holding the lease, or after amoCRM answered, before commit."""
        proc = self.procs[p]

        async def die() -> None:
            kill_pid(proc.pid)
            await proc.store.close()

        proc.refresher.crash_at, proc.refresher.crash = point, die
        proc.refresher.manual = how == "manual"
        manager = proc.manager
        refresh = (
            manager.refresh("manual")
            if how == "manual"
            else manager.unauthorized(manager.generation)
        )
        try:
            self._attempt(f"{how} refresh via p{p}, armed {point}", refresh)
        except Exception:
            if not proc.refresher.died:
                raise
        proc.refresher.crash_at = proc.refresher.crash = None
        proc.refresher.manual = False
        if not proc.refresher.died:
            return  # the refresh never reached the token endpoint: nothing to crash in
        if point == "after_answer":
            # amoCRM spent the stored refresh token and its answer died with the process.
            self._doom("lost answer")
            self.lost_answers += 1
        self.runner.run(self._restart(p))

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def lifecycle_holds(self) -> None:
        before, now = self.snapshot, self.runner.run(self._observe())
        self.snapshot = now

        # 3. The store's generation never goes back, and no process is ahead of it.
        assert now.generation >= before.generation, "the stored generation went back"
        for proc in self.procs:
            assert proc.manager.generation <= now.generation, f"{proc.name} is ahead of the store"

        # 2. Every grant amoCRM gave became exactly one generation, except answers lost with a
        # crashed process: no refresh was wasted, none was committed twice.
        committed = now.refresh_calls - self.lost_answers
        assert now.generation == 1 + self.reimports + committed, (
            f"generation {now.generation} but {now.refresh_calls} grants, "
            f"{self.lost_answers} lost, {self.reimports} imports"
        )

        # 1. The store holds amoCRM's newest, live refresh token, or says reauth_required with a
        # reason; reauth_required only ever follows a revocation or a lost answer.
        if now.state is not None:
            assert now.state.state == "reauth_required", f"unknown state {now.state.state}"
            assert now.state.reason, "reauth_required without a reason"
            assert now.state.generation == now.generation
            assert now.doomed is not None, "reauth_required although the grant was sound"
        elif now.doomed is None:
            assert now.refresh_fp == self.newest_fp, (
                f"the store holds {now.refresh_fp}, amoCRM last issued {self.newest_fp}"
            )
            assert now.refresh_live, f"the stored refresh token {now.refresh_fp} is dead"

        # 1 (doomed) and 2. A refused grant happens only after a revocation or a lost answer,
        # and the attempt that meets it persists reauth_required: never a loop of refusals.
        if now.rejected_calls > before.rejected_calls:
            assert before.doomed is not None, "amoCRM refused a grant the broker should own"
            assert now.state is not None, "a refused grant did not persist reauth_required"

        # 2. The lease serialises refreshes, so each revocation or lost answer costs at most one
        # refused grant across all processes (an operator's manual refresh aside).
        refusals = self.refused - self.refused_at_doom
        assert refusals <= 1, f"{refusals} refused grants for one {self.doomed or 'event'}"

        # 2. Once reauth_required is persisted, no process calls the token endpoint until a new
        # pair is stored (an operator's manual refresh excepted: it asks to try again).
        after_reauth = self.calls_after_reauth_by_dead + sum(
            proc.refresher.calls_after_reauth for proc in self.procs
        )
        assert after_reauth == 0, (
            f"{after_reauth} token endpoint call(s) after reauth_required was persisted"
        )


TokenLifecycle.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    # No explain phase: it reruns the failing case under a tracer, which costs more than the
    # whole search here and tells less than the printed steps.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


class TestTokenLifecycle(TokenLifecycle.TestCase):
    """Requests, expiries, outages, revocations and crashes never break the token lifecycle."""


# Replayed on every run, because the random search reaches them in only some runs. The first
# is what this search found against the refresher before it re-read the shared state under the
# lease (a process that had not yet seen reauth_required spent the refused token again); the
# next three reach the same gap by other paths; the slow-disk one needs the lease to be held
# until reauth_required is written, not released before it.
FOUND = {
    "two 401s at once after a revocation": [
        ("grant_revoked",),
        ("both_processes_meet_a_401", False),
    ],
    "two 401s at once after a revocation, on a slow disk": [
        ("grant_revoked",),
        ("both_processes_meet_a_401", True),
    ],
    "the other process's loop after a revocation": [
        ("grant_revoked",),
        ("time_passes_refresh_margin_then_tick", 0),
        ("time_passes_refresh_margin_then_tick", 1),
    ],
    "the other process's 401 after a revocation": [
        ("grant_revoked",),
        ("time_passes_refresh_margin_then_tick", 0),
        ("access_tokens_expire",),
        ("request", 1),
    ],
    "a restarted process's 401 after a lost answer": [
        ("crash_during_refresh", 0, "after_answer", "unauthorized"),
        ("access_tokens_expire",),
        ("request", 1),
        ("request", 0),
    ],
}


@pytest.mark.parametrize("steps", FOUND.values(), ids=FOUND.keys())
def test_found_sequences_keep_the_lifecycle(steps: list[tuple[Any, ...]]) -> None:
    """Sequences that once broke an invariant keep every invariant now."""
    machine = TokenLifecycle()
    try:
        machine.lifecycle_holds()
        for name, *args in steps:
            getattr(machine, name)(*args)
            machine.lifecycle_holds()
    finally:
        machine.teardown()
