"""Imports the broker makes by itself: AMOCRM_* tokens in the environment at start."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.importing import bootstrap_from_env
from tests.conftest import ConfigFactory, pair_from_sandbox


async def test_the_environment_bootstrap_never_imports_a_spent_token(
    make_config: ConfigFactory, sandbox: Sandbox, db_path: Path
) -> None:
    """AMOCRM_* tokens the history knows as refused are not imported into an empty row."""
    pair = pair_from_sandbox(sandbox)
    config = make_config(
        AMOCRM_REFRESH_TOKEN=str(pair.refresh_token), AMOCRM_ACCESS_TOKEN=pair.access_token
    )
    store = await TokenStore.open(db_path, Sealer(config.require_key()))
    try:
        await store.record_failure(
            reason="expiry",
            generation=1,
            old_refresh=pair.refresh_token,
            error="refused",
            outcome="rejected",
        )
        with capture_logs() as logs:
            await bootstrap_from_env(config, store, 0.0)
        assert await store.info() is None
    finally:
        await store.close()
    [event] = [e for e in logs if e["event"] == "bootstrap_tokens_refused"]
    assert event["log_level"] == "error"
    assert str(pair.refresh_fingerprint) in event["error"]
