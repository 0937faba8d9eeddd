"""Tests for broker.store.sealing: sealed values open only where, and with the key, they were
sealed."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import pytest

from broker.errors import StoreLockedError
from broker.pair import fingerprint
from broker.store.sealing import DecryptError, Sealer, key_id, new_key
from tests.conftest import assert_no_leak

PLAINTEXT = "def50200" + "a1b2c3d4" * 16
ACCOUNT, FIELD = "default", "refresh_token"
VERSION_LEN, KID_LEN, NONCE_LEN = 2, 8, 12
HEADER = VERSION_LEN + KID_LEN + NONCE_LEN


def raw_key() -> bytes:
    return base64.urlsafe_b64decode(new_key())


@pytest.fixture
def current() -> bytes:
    return raw_key()


@pytest.fixture
def sealer(current: bytes) -> Sealer:
    return Sealer(current)


@pytest.fixture
def blob(sealer: Sealer) -> bytes:
    return sealer.seal(PLAINTEXT, account=ACCOUNT, field=FIELD)


@pytest.mark.parametrize("text", [PLAINTEXT, "", "токен ✓ with unicode"])
def test_seal_then_open_gives_the_plaintext_back(sealer: Sealer, text: str) -> None:
    """What is sealed for an account and field opens to the same text there."""
    sealed = sealer.seal(text, account=ACCOUNT, field=FIELD)
    opened = sealer.open(sealed, account=ACCOUNT, field=FIELD)
    assert fingerprint(opened) == fingerprint(text)


def test_every_seal_uses_a_fresh_nonce(sealer: Sealer) -> None:
    """Sealing the same text twice gives different bytes and different nonces."""
    first = sealer.seal(PLAINTEXT, account=ACCOUNT, field=FIELD)
    second = sealer.seal(PLAINTEXT, account=ACCOUNT, field=FIELD)
    assert first != second
    nonce = slice(VERSION_LEN + KID_LEN, HEADER)
    assert first[nonce] != second[nonce]


def test_sealed_bytes_carry_the_version_and_current_key_id(sealer: Sealer, blob: bytes) -> None:
    """The blob starts with b'v1' and the 8-hex id of the key that sealed it."""
    assert blob[:VERSION_LEN] == b"v1"
    assert blob[VERSION_LEN : HEADER - NONCE_LEN].decode("ascii") == sealer.current_key_id


def test_plaintext_does_not_appear_in_the_sealed_bytes(blob: bytes) -> None:
    """The token is encrypted, not encoded: it is nowhere in the stored bytes."""
    assert_no_leak(blob, PLAINTEXT, PLAINTEXT[:16], PLAINTEXT[-16:])
    assert_no_leak(base64.b64encode(blob), base64.b64encode(PLAINTEXT.encode()).decode())


@pytest.mark.parametrize(
    ("account", "field"),
    [(ACCOUNT, "access_token"), ("other-account", FIELD), ("other-account", "access_token")],
)
def test_ciphertext_moved_to_another_field_or_account_does_not_open(
    sealer: Sealer, blob: bytes, account: str, field: str
) -> None:
    """Associated data binds account and field: a copied ciphertext is refused."""
    with pytest.raises(DecryptError):
        sealer.open(blob, account=account, field=field)


def test_wrong_key_names_both_key_ids(current: bytes, blob: bytes) -> None:
    """Opening with another key says which key sealed it and which one is configured."""
    other = raw_key()
    with pytest.raises(DecryptError) as caught:
        Sealer(other).open(blob, account=ACCOUNT, field=FIELD)
    message = str(caught.value)
    assert key_id(current) in message
    assert key_id(other) in message
    assert_no_leak(message, PLAINTEXT, new_key(), current.hex())


def test_relabelled_key_id_does_not_open(current: bytes, blob: bytes) -> None:
    """Swapping the key id in the header for another known key's id is detected."""
    other = raw_key()
    relabelled = blob[:VERSION_LEN] + key_id(other).encode() + blob[HEADER - NONCE_LEN :]
    with pytest.raises(DecryptError):
        Sealer(other, current).open(relabelled, account=ACCOUNT, field=FIELD)


@pytest.mark.parametrize(
    "index",
    [0, VERSION_LEN, VERSION_LEN + KID_LEN, HEADER, HEADER + 5, -1],
    ids=["version", "key-id", "nonce", "ciphertext-start", "ciphertext", "tag-end"],
)
def test_any_flipped_byte_is_detected(sealer: Sealer, blob: bytes, index: int) -> None:
    """Changing any single byte of a sealed value makes it refuse to open."""
    tampered = bytearray(blob)
    tampered[index] ^= 0x01
    with pytest.raises(DecryptError):
        sealer.open(bytes(tampered), account=ACCOUNT, field=FIELD)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b"v1",
        lambda b: b[:HEADER],
        lambda b: b[: HEADER + 8],
        lambda b: b[:-1],
        lambda b: b"plain text that was never sealed, stored by mistake",
        lambda b: b"v1" + os.urandom(60),
        lambda b: os.urandom(len(b)),
    ],
    ids=["empty", "version-only", "header-only", "short-tag", "truncated", "text", "v1-noise",
         "noise"],
)  # fmt: skip
def test_truncated_or_garbage_blob_is_a_decrypt_error(
    sealer: Sealer, blob: bytes, mangle: Callable[[bytes], bytes]
) -> None:
    """Anything that is not an intact sealed value raises DecryptError, nothing else."""
    with pytest.raises(DecryptError):
        sealer.open(mangle(blob), account=ACCOUNT, field=FIELD)


def test_older_key_still_opens_old_values_while_new_seals_use_the_current(
    current: bytes, blob: bytes
) -> None:
    """After rotation, old values open with the older key; new ones are sealed with the new."""
    newer = raw_key()
    rotated = Sealer(newer, current)
    opened = rotated.open(blob, account=ACCOUNT, field=FIELD)
    assert fingerprint(opened) == fingerprint(PLAINTEXT)
    fresh = rotated.seal(PLAINTEXT, account=ACCOUNT, field=FIELD)
    assert rotated.current_key_id == key_id(newer)
    assert fresh[VERSION_LEN : HEADER - NONCE_LEN].decode() == key_id(newer)
    with pytest.raises(DecryptError):
        Sealer(current).open(fresh, account=ACCOUNT, field=FIELD)


def test_new_key_is_32_random_bytes_in_urlsafe_base64() -> None:
    """new_key() decodes to 32 bytes, and two keys differ."""
    first, second = new_key(), new_key()
    assert len(base64.urlsafe_b64decode(first)) == 32
    assert first != second
    assert set(first) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


def test_key_id_is_short_stable_and_does_not_reveal_the_key(current: bytes) -> None:
    """key_id is 8 hex, the same for the same key, different for another key."""
    assert key_id(current) == key_id(bytes(current))
    assert len(key_id(current)) == 8
    int(key_id(current), 16)
    assert key_id(current) != key_id(raw_key())


def test_decrypt_error_is_a_store_locked_error() -> None:
    """A DecryptError is reported as store_locked (503), like any key problem."""
    error = DecryptError("x")
    assert isinstance(error, StoreLockedError)
    assert error.code == "store_locked"
    assert error.http_status == 503
