"""Key files: read one only if no other user of the machine can, write one that no one else can.

The store key decides who can open the token pair, so its file gets the checks ssh gives a
private key: created with O_EXCL and mode 0600, refused when group or others may read it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from broker.errors import ConfigError


def decode_key(text: str, origin: str) -> bytes:
    """Decode a urlsafe-base64 key of exactly 32 bytes, naming `origin` when it is not one."""
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ConfigError(f"{origin}: not urlsafe base64 (use `amo-broker keygen`)") from None
    if len(key) != 32:
        raise ConfigError(f"{origin}: the key must be 32 bytes, this one is {len(key)}")
    return key


def read_key_file(path: Path) -> bytes:
    """Read a key file, refusing one that other users of the machine can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"key file {path} cannot be read: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {path} is open to group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    return decode_key(text, f"key file {path}")


def write_key_file(path: Path, key: str) -> None:
    """Create `path` with mode 0600, refusing to overwrite an existing key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: not overwriting a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key + "\n")
