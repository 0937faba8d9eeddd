"""Tests for broker.config.keyfile: key files are private on creation and never overwritten."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from broker.config.keyfile import read_key_file, write_key_file
from broker.errors import ConfigError
from broker.store.sealing import key_id, new_key


def test_write_key_file_creates_a_private_file(tmp_path: Path) -> None:
    """keygen's file is mode 0600 and reads back as the same key."""
    path = tmp_path / "new.key"
    text = new_key()
    write_key_file(path, text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(read_key_file(path)) == key_id(base64.urlsafe_b64decode(text))


def test_write_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing key file is never replaced (that would orphan every sealed token)."""
    path = tmp_path / "existing.key"
    original = new_key()
    write_key_file(path, original)
    with pytest.raises(ConfigError) as caught:
        write_key_file(path, new_key())
    assert str(path) in str(caught.value)
    assert path.read_text(encoding="ascii") == original + "\n"
