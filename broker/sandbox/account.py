"""Answer `GET /api/v4/account?with=...` with the extra parts amoCRM adds on request.

Client libraries ask for these when they start (rights, users' groups, task types,
date formats) and parse them into models, so their shapes follow amoCRM's documentation
(crm_platform/account-info): some extras are top-level fields, the others go under
`_embedded`. A `with` value amoCRM does not know is ignored, as amoCRM ignores it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

AMOJO_ID = "5a7c9f54-7e52-4f63-9d0c-0b1e3f1a2c3d"
VERSION = 12_345

# Top-level fields: `with` name -> value.
_TOP_LEVEL: dict[str, Any] = {
    "amojo_id": AMOJO_ID,
    "amojo_rights": {"can_direct": True, "can_create_groups": True},
    "version": VERSION,
    "drive_url": "https://drive-b.amocrm.ru",
    "is_api_filter_enabled": True,
}
# Parts under `_embedded`: `with` name -> value.
_EMBEDDED: dict[str, Any] = {
    "users_groups": [{"id": 0, "name": "Отдел продаж", "uuid": None}],
    "task_types": [
        {"id": 1, "name": "Связаться", "color": None, "icon_id": None, "code": "FOLLOW_UP"},
        {"id": 2, "name": "Встреча", "color": None, "icon_id": None, "code": "MEETING"},
    ],
    "entity_names": {
        "leads": {
            "ru": {
                "gender": "f",
                "singular_form": {"default": "сделка"},
                "plural_form": {"default": "сделки"},
            },
            "en": {
                "gender": "m",
                "singular_form": {"default": "lead"},
                "plural_form": {"default": "leads"},
            },
        }
    },
    "datetime_settings": {
        "date_pattern": "d.m.Y H:i",
        "short_date_pattern": "d.m.Y",
        "short_time_pattern": "H:i",
        "date_format": "d.m.Y",
        "time_format": "H:i:s",
        "timezone": "Europe/Moscow",
        "timezone_offset": "+03:00",
    },
    "invoices_settings": {"lang": "ru", "invoices_catalog_id": None},
}
KNOWN = frozenset(_TOP_LEVEL) | frozenset(_EMBEDDED)


def requested(raw: Iterable[str]) -> list[str]:
    """Split `with` values (`a,b` or repeated) into names, in order, without repeats."""
    names: list[str] = []
    for value in raw:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def extras(names: Iterable[str]) -> dict[str, Any]:
    """Return the fields to merge into the account for these `with` names (unknown ones: none).

    `_embedded` is present only when some part of it was asked for, as in amoCRM's answers.
    """
    top = {name: _TOP_LEVEL[name] for name in names if name in _TOP_LEVEL}
    embedded = {name: _EMBEDDED[name] for name in names if name in _EMBEDDED}
    return {**top, "_embedded": embedded} if embedded else top
