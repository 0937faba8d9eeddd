"""Fixtures for tests that run the `amo-broker` command in-process (see tests/cli_harness.py).

Registered for the whole suite by `pytest_plugins` in tests/conftest.py, so none is autouse
here: a module that wants `clean_env` on every test applies it with an autouse wrapper of its
own. (A module-level `pytest.mark.usefixtures` would not do: it orders `clean_env` after a
test's own `usefixtures` marks, so it would wipe the variables those fixtures just set.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Keep the machine's AMOCRM_*/BROKER_* settings and ./broker.toml out of every test."""
    for name in list(os.environ):
        if name.startswith(("AMOCRM_", "BROKER_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    structlog.reset_defaults()
