"""The [notify] settings: URLs from TOML lists or env commas, templates checked, secrets kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config.load import load_config
from broker.config.notify import fill
from broker.errors import ConfigError
from tests.conftest import assert_no_leak

ACCOUNTS = """
[[accounts]]
name = "main"
default = true
base_url = "https://main.amocrm.ru"
notify_webhook_url = ["https://hooks.example.com/main"]

[[accounts]]
name = "quiet"
base_url = "https://quiet.amocrm.ru"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_urls_come_as_a_toml_list_or_commas_in_the_environment(tmp_path: Path) -> None:
    """A TOML list and BROKER_NOTIFY_URL's commas give the same tuple; env wins over TOML."""
    toml = write(
        tmp_path, '[notify]\nwebhook_url = ["https://a.example/x", "http://127.0.0.1:9/y"]'
    )
    assert load_config(toml, environ={}).notify_urls == (
        "https://a.example/x",
        "http://127.0.0.1:9/y",
    )
    env = {"BROKER_NOTIFY_URL": "https://b.example/1, https://c.example/2"}
    assert load_config(toml, environ=env).notify.urls == (
        "https://b.example/1",
        "https://c.example/2",
    )
    assert load_config(None, environ={}).notify_urls == ()


def test_an_account_table_overrides_the_notify_urls(tmp_path: Path) -> None:
    """`notify_webhook_url` in [[accounts]] replaces [notify]'s for that account only."""
    toml = write(tmp_path, '[notify]\nwebhook_url = "https://all.example/x"\n' + ACCOUNTS)
    config = load_config(toml, environ={})
    assert config.for_account("main").notify_urls == ("https://hooks.example.com/main",)
    assert config.for_account("quiet").notify_urls == ("https://all.example/x",)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BROKER_NOTIFY_URL": "http://hooks.example.com/x"}, "https is required"),
        ({"BROKER_NOTIFY_URL": "ftp://x"}, "expected http(s) URLs"),
        ({"BROKER_NOTIFY_TEMPLATE": '{"text": {text}}'}, "not JSON once filled in"),
        ({"BROKER_NOTIFY_TEMPLATE": '{"text": "{token}"}'}, "unknown placeholder(s) token"),
        ({"BROKER_NOTIFY_SECRET": "a", "BROKER_NOTIFY_SECRET_FILE": "/x"}, "not both"),
    ],
)
def test_bad_notify_settings_are_named(env: dict[str, str], needle: str) -> None:
    """Each bad [notify] value is refused with a message naming what is wrong."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=env)
    assert needle in caught.value.message


def test_the_secret_file_must_be_private_and_never_shows(tmp_path: Path) -> None:
    """secret_file is read relative to the config file, refused if others may read it."""
    secret = tmp_path / "notify.secret"
    secret.write_text("sign-me-123\n")
    secret.chmod(0o644)
    toml = write(tmp_path, '[notify]\nsecret_file = "notify.secret"')
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(toml, environ={})
    secret.chmod(0o600)
    config = load_config(toml, environ={})
    assert config.notify.secret is not None and config.notify.secret.reveal() == "sign-me-123"
    assert_no_leak(repr(config), "sign-me-123")


def test_fill_escapes_values_for_the_inside_of_a_json_string() -> None:
    """Quotes, backslashes and newlines in a value cannot break out of the template's string."""
    filled = fill('{"t": "{text}", "x": "{other}"}', {"text": 'a"b\\c\nd'})
    assert filled == '{"t": "a\\"b\\\\c\\nd", "x": "{other}"}'
