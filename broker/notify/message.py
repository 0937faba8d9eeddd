"""Shape a notification's body (ours, or the configured template) and sign it.

Pure functions: the delivery posts whatever bytes come out of here. The body holds the
account's name, state and a message, never a token: the messages come from /status's
`last_error` texts and our own words, which name fingerprints at most.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from broker.config.notify import fill
from broker.notify.detect import Event
from broker.timing import iso

SIGNATURE_HEADER = "X-Broker-Signature"

_ICONS = {
    "reauth_required": ":rotating_light:",
    "blocked": ":no_entry:",
    "store_degraded": ":warning:",
    "refresh_failing": ":warning:",
    "long_lived_expiring": ":hourglass:",
    "refresh_token_aging": ":hourglass:",
}


def text_line(event: Event) -> str:
    """One line for a chat: what happened to which account, and what to do."""
    icon = _ICONS.get(event.event, ":white_check_mark:")
    return f"{icon} amo-broker: account {event.account}: {event.event} — {event.message}"


def fields(event: Event) -> dict[str, str | int]:
    """The body's fields: event, account, state, since, generation, message, text."""
    return {
        "event": event.event,
        "account": event.account,
        "state": event.state,
        "since": iso(event.since) or "",
        "generation": event.generation,
        "message": event.message,
        "text": text_line(event),
    }


def body(event: Event, template: str | None = None) -> bytes:
    """The exact bytes to post: our JSON object, or `template` filled with the fields."""
    values = fields(event)
    if template is None:
        return json.dumps(values, ensure_ascii=False).encode()
    return fill(template, {k: str(v) for k, v in values.items()}).encode()


def signature(secret: str, payload: bytes) -> str:
    """The X-Broker-Signature value: `sha256=` and the hex HMAC-SHA256 of the exact body."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
