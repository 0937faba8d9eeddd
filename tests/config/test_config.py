"""Tests for broker.config: where each setting comes from, what is refused, what never shows."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from broker.config.load import SETTINGS, ConfigError, load_config
from broker.config.model import Config, LimitSettings, OAuthClientConfig, Secret
from broker.pair import fingerprint
from broker.store.sealing import key_id, new_key
from tests.conftest import assert_no_leak

CLIENT_SECRET = "client-secret-value-0123456789"
ACCESS = "bootstrap-access-token-value-abcdef"
REFRESH = "def50200bootstrap-refresh-token-value"


@pytest.fixture(autouse=True)
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test from an empty directory, so no stray ./broker.toml is picked up."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def toml_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def key_file(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n", encoding="ascii")
    path.chmod(mode)
    return path


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# -- precedence ------------------------------------------------------------------------------

PRECEDENCE = [
    # (section, key, env, attribute, TOML literal, env value, flag value, expected per layer)
    pytest.param(
        "server", "port", "BROKER_PORT", "port", "1111", "2222", 3333,
        (8787, 1111, 2222, 3333), id="server.port",
    ),
    pytest.param(
        "server", "host", "BROKER_HOST", "host", '"10.0.0.1"', "10.0.0.2", "10.0.0.3",
        ("127.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"), id="server.host",
    ),
    pytest.param(
        "log", "level", "BROKER_LOG_LEVEL", "log_level", '"warning"', "error", "debug",
        ("info", "warning", "error", "debug"), id="log.level",
    ),
    pytest.param(
        "refresh", "margin_seconds", "BROKER_REFRESH_MARGIN", "margin_seconds", "30", "40", 50,
        (600.0, 30.0, 40.0, 50.0), id="refresh.margin_seconds",
    ),
    pytest.param(
        "amocrm", "client_id", "AMOCRM_CLIENT_ID", "client_id", '"from-file"', "from-env",
        "from-flag", (None, "from-file", "from-env", "from-flag"), id="amocrm.client_id",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("section", "key", "env", "attr", "literal", "env_value", "flag_value", "expected"),
    PRECEDENCE,
)
def test_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path,
    section: str,
    key: str,
    env: str,
    attr: str,
    literal: str,
    env_value: str,
    flag_value: object,
    expected: tuple[object, object, object, object],
) -> None:
    """Each layer overrides the one below it: default < TOML < environment < flag."""
    source = toml_file(tmp_path / "conf" / "broker.toml", f"[{section}]\n{key} = {literal}\n")
    flags = {f"{section}.{key}": flag_value}
    layers = (
        load_config(None, environ={}),
        load_config(source, environ={}),
        load_config(source, environ={env: env_value}),
        load_config(source, environ={env: env_value}, overrides=flags),
    )
    assert tuple(getattr(config, attr) for config in layers) == expected


def test_none_flag_counts_as_not_given(tmp_path: Path) -> None:
    """A flag whose value is None (not passed on the command line) does not hide the env."""
    config = load_config(None, environ={"BROKER_PORT": "2222"}, overrides={"server.port": None})
    assert config.port == 2222


def test_empty_environment_values_count_as_unset(tmp_path: Path) -> None:
    """An exported-but-empty variable falls through to the file, not to an error or ''."""
    source = toml_file(tmp_path / "broker.toml", "[server]\nport = 1111\n")
    config = load_config(
        source,
        environ={
            "BROKER_PORT": "",
            "AMOCRM_CLIENT_ID": "",
            "BROKER_ENCRYPTION_KEY": "",
            "AMOCRM_ACCESS_TOKEN": "",
            "AMOCRM_REFRESH_TOKEN": "",
        },
    )
    assert config.port == 1111
    assert config.client_id is None
    assert config.key is None
    assert config.bootstrap_access_token is None
    assert config.bootstrap_refresh_token is None


def test_bootstrap_tokens_come_from_the_environment() -> None:
    """AMOCRM_ACCESS_TOKEN / AMOCRM_REFRESH_TOKEN land in the bootstrap fields, as Secrets."""
    config = load_config(
        None, environ={"AMOCRM_ACCESS_TOKEN": ACCESS, "AMOCRM_REFRESH_TOKEN": REFRESH}
    )
    assert config.bootstrap_access_token is not None
    assert config.bootstrap_refresh_token is not None
    assert fingerprint(config.bootstrap_access_token.reveal()) == fingerprint(ACCESS)
    assert fingerprint(config.bootstrap_refresh_token.reveal()) == fingerprint(REFRESH)


# -- finding the TOML file ------------------------------------------------------------------


def test_explicit_config_path_is_read(tmp_path: Path) -> None:
    """A path passed in (--config) is the file used."""
    source = toml_file(tmp_path / "elsewhere" / "my.toml", "[server]\nport = 1234\n")
    config = load_config(source, environ={})
    assert config.port == 1234
    assert config.source == source.resolve()


def test_broker_config_env_names_the_file(tmp_path: Path) -> None:
    """BROKER_CONFIG points at the file when no path is passed."""
    source = toml_file(tmp_path / "elsewhere" / "my.toml", "[server]\nport = 1235\n")
    config = load_config(None, environ={"BROKER_CONFIG": str(source)})
    assert config.port == 1235
    assert config.source == source.resolve()


def test_explicit_path_beats_broker_config(tmp_path: Path) -> None:
    """--config wins over BROKER_CONFIG."""
    flag = toml_file(tmp_path / "flag.toml", "[server]\nport = 1001\n")
    env = toml_file(tmp_path / "env.toml", "[server]\nport = 1002\n")
    assert load_config(flag, environ={"BROKER_CONFIG": str(env)}).port == 1001


def test_broker_toml_in_cwd_is_found(cwd: Path) -> None:
    """Without --config or BROKER_CONFIG, ./broker.toml is read."""
    toml_file(cwd / "broker.toml", "[server]\nport = 1236\n")
    config = load_config(None, environ={})
    assert config.port == 1236
    assert config.source == (cwd / "broker.toml").resolve()


def test_no_config_file_anywhere_means_defaults() -> None:
    """With no file to find, every setting has its default and no source is recorded."""
    config = load_config(None, environ={})
    assert config.source is None
    assert (config.port, config.host, config.log_format) == (8787, "127.0.0.1", "json")


def test_missing_explicit_config_file_is_named(tmp_path: Path) -> None:
    """A --config path that does not exist is an error naming that path."""
    missing = tmp_path / "nope" / "broker.toml"
    message = config_error(path=missing, environ={})
    assert str(missing) in message
    assert "--config" in message


def test_missing_broker_config_file_is_named(tmp_path: Path) -> None:
    """A BROKER_CONFIG path that does not exist is an error naming the variable and path."""
    missing = tmp_path / "gone.toml"
    message = config_error(path=None, environ={"BROKER_CONFIG": str(missing)})
    assert "BROKER_CONFIG" in message
    assert str(missing) in message


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is refused with its path in the message."""
    source = toml_file(tmp_path / "broken.toml", "[server\nport = \n")
    assert str(source.resolve()) in config_error(path=source, environ={})


# -- unknown settings -----------------------------------------------------------------------


def test_unknown_keys_and_sections_are_each_named(tmp_path: Path) -> None:
    """Typos in keys and sections are refused, every one named, not silently defaulted."""
    source = toml_file(
        tmp_path / "broker.toml",
        "verbose = true\n"
        "[server]\nport = 1\nprot = 2\n"
        "[amocrm]\nclientid = 'x'\n"
        "[sevrer]\nport = 1\n",
    )
    message = config_error(path=source, environ={})
    for name in ("[server] prot", "[amocrm] clientid", "[sevrer]", "[verbose]"):
        assert name in message
    assert "[server] port" not in message


# -- base_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://example.amocrm.ru", "https://example.amocrm.ru"),
        ("https://example.amocrm.ru/", "https://example.amocrm.ru"),
        ("https://example.amocrm.ru:8443", "https://example.amocrm.ru:8443"),
        ("http://127.0.0.5:8080", "http://127.0.0.5:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://localhost:8080", "http://localhost:8080"),
    ],
)
def test_base_url_accepts_https_and_loopback_http(raw: str, expected: str) -> None:
    """https anywhere, plain http only on a loopback host; a trailing slash is dropped."""
    assert load_config(None, environ={"AMOCRM_BASE_URL": raw}).base_url == expected


@pytest.mark.parametrize(
    "raw",
    [
        "http://example.com",
        "http://10.0.0.1:8080",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",
    ],
)
def test_base_url_refuses_plain_http_off_loopback(raw: str) -> None:
    """Plain http to a non-loopback host would send the client secret in clear: refused."""
    message = config_error(path=None, environ={"AMOCRM_BASE_URL": raw})
    assert "AMOCRM_BASE_URL" in message
    assert "https is required" in message


@pytest.mark.parametrize(
    "raw",
    [
        "https://example.com/api",
        "https://example.com/oauth2/access_token",
        "https://example.com?x=1",
        "https://example.com#frag",
        "https://user:pw@example.com",
        "ftp://example.com",
        "example.com",
    ],
)
def test_base_url_must_be_only_scheme_and_host(raw: str) -> None:
    """A base_url with a path, query, fragment, user info or wrong scheme is refused."""
    assert "AMOCRM_BASE_URL" in config_error(path=None, environ={"AMOCRM_BASE_URL": raw})


@pytest.mark.parametrize(
    "raw",
    [
        "https://:pw@example.com",
        "https://example.com?",
        "https://example.com#",
        "https://example.com:notaport",
        "https://example.com:99999",
    ],
)
def test_base_url_refuses_empty_userinfo_query_fragment_or_bad_port(raw: str) -> None:
    """Empty-but-present parts and invalid ports are no more 'scheme, host, port' than full ones."""
    assert "AMOCRM_BASE_URL" in config_error(path=None, environ={"AMOCRM_BASE_URL": raw})


def test_refused_base_url_does_not_echo_a_password() -> None:
    """The error for a base_url with credentials in it does not repeat the password."""
    password = "pw-in-url-0123456789"
    message = config_error(
        path=None, environ={"AMOCRM_BASE_URL": f"https://user:{password}@example.com"}
    )
    assert_no_leak(message, password)


def test_base_url_from_toml_is_validated_and_named(tmp_path: Path) -> None:
    """The same checks apply to [amocrm] base_url, and the message names the TOML key."""
    source = toml_file(tmp_path / "broker.toml", '[amocrm]\nbase_url = "http://example.com"\n')
    assert "[amocrm] base_url" in config_error(path=source, environ={})


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["65536", "-1", "http", "80.5", " "])
def test_bad_port_names_broker_port(raw: str) -> None:
    """A port out of range or not a whole number is refused naming BROKER_PORT."""
    assert "BROKER_PORT" in config_error(path=None, environ={"BROKER_PORT": raw})


def test_bad_port_flag_names_the_flag() -> None:
    """A bad --port is reported as --port, not as the environment variable."""
    message = config_error(path=None, environ={}, overrides={"server.port": 70000})
    assert "--port" in message


def test_bool_port_in_toml_is_refused(tmp_path: Path) -> None:
    """`port = true` is not port 1."""
    source = toml_file(tmp_path / "broker.toml", "[server]\nport = true\n")
    assert "[server] port" in config_error(path=source, environ={})


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "inf", "soon"])
def test_bad_margin_names_its_variable(raw: str) -> None:
    """Seconds must be a positive finite number; the message names BROKER_REFRESH_MARGIN."""
    message = config_error(path=None, environ={"BROKER_REFRESH_MARGIN": raw})
    assert "BROKER_REFRESH_MARGIN" in message


@pytest.mark.parametrize("raw", ["0", "0.5", "301", "nan", "soon"])
def test_bad_store_timeout_names_its_variable(raw: str) -> None:
    """The store's bound must be 1 to 300 seconds; the message names BROKER_STORE_TIMEOUT."""
    message = config_error(path=None, environ={"BROKER_STORE_TIMEOUT": raw})
    assert "BROKER_STORE_TIMEOUT" in message


def test_store_timeout_from_toml_and_default(tmp_path: Path) -> None:
    """[store] timeout_seconds sets the store's bound; unset, it is 10 seconds."""
    assert load_config(None, environ={}).store_timeout == 10.0
    source = toml_file(tmp_path / "broker.toml", "[store]\ntimeout_seconds = 4\n")
    assert load_config(source, environ={}).store_timeout == 4.0


# -- the encryption key ---------------------------------------------------------------------


def test_encryption_key_from_environment_is_decoded() -> None:
    """BROKER_ENCRYPTION_KEY is urlsafe base64 of 32 bytes and becomes the store key."""
    text = new_key()
    config = load_config(None, environ={"BROKER_ENCRYPTION_KEY": text})
    assert key_id(config.require_key()) == key_id(base64.urlsafe_b64decode(text))
    assert config.key_source == "BROKER_ENCRYPTION_KEY"


@pytest.mark.parametrize(
    "raw",
    [
        base64.urlsafe_b64encode(b"k" * 16).decode(),
        base64.urlsafe_b64encode(b"k" * 33).decode(),
    ],
)
def test_encryption_key_of_wrong_length_is_named(raw: str) -> None:
    """A key that decodes to anything but 32 bytes is refused naming the variable."""
    message = config_error(path=None, environ={"BROKER_ENCRYPTION_KEY": raw})
    assert "BROKER_ENCRYPTION_KEY" in message
    assert "32 bytes" in message
    assert_no_leak(message, raw)


@pytest.mark.parametrize("raw", ["abcde", "ключ-не-base64"])
def test_encryption_key_not_base64_is_named(raw: str) -> None:
    """A key that is not base64 at all is refused naming the variable."""
    message = config_error(path=None, environ={"BROKER_ENCRYPTION_KEY": raw})
    assert "BROKER_ENCRYPTION_KEY" in message
    assert "base64" in message


def test_key_file_missing_is_named(tmp_path: Path) -> None:
    """A key file that does not exist is refused with its path."""
    missing = tmp_path / "absent.key"
    message = config_error(path=None, environ={"BROKER_KEY_FILE": str(missing)})
    assert str(missing) in message
    assert "does not exist" in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    """A key file open to group or others is refused, and the message says how to fix it."""
    path = key_file(tmp_path / "broker.key", new_key(), mode)
    message = config_error(path=None, environ={"BROKER_KEY_FILE": str(path)})
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message


def test_key_file_with_mode_0600_is_accepted(tmp_path: Path) -> None:
    """A private key file is read and decoded."""
    text = new_key()
    path = key_file(tmp_path / "broker.key", text)
    config = load_config(None, environ={"BROKER_KEY_FILE": str(path)})
    assert key_id(config.require_key()) == key_id(base64.urlsafe_b64decode(text))
    assert str(path) in config.key_source


def test_key_file_with_bad_content_names_the_file(tmp_path: Path) -> None:
    """A key file holding a short key is refused naming the file, not the variable."""
    path = key_file(tmp_path / "broker.key", base64.urlsafe_b64encode(b"x" * 8).decode())
    message = config_error(path=None, environ={"BROKER_KEY_FILE": str(path)})
    assert f"key file {path}" in message


def test_require_key_says_where_a_key_comes_from() -> None:
    """With no key configured, require_key names both sources and the keygen command."""
    config = load_config(None, environ={})
    with pytest.raises(ConfigError) as caught:
        config.require_key()
    message = str(caught.value)
    for hint in ("BROKER_ENCRYPTION_KEY", "BROKER_KEY_FILE", "key_file", "amo-broker keygen"):
        assert hint in message


# -- paths relative to the config file ------------------------------------------------------


def test_relative_store_path_and_key_file_resolve_against_the_toml_dir(
    tmp_path: Path, cwd: Path
) -> None:
    """Relative paths in a config file mean relative to that file, not to the cwd."""
    conf_dir = tmp_path / "etc" / "broker"
    text = new_key()
    conf_dir.mkdir(parents=True)
    key_file(conf_dir / "broker.key", text)
    source = toml_file(
        conf_dir / "broker.toml", '[store]\npath = "data/broker.db"\nkey_file = "broker.key"\n'
    )
    config = load_config(source, environ={})
    assert config.db_path == conf_dir.resolve() / "data" / "broker.db"
    assert key_id(config.require_key()) == key_id(base64.urlsafe_b64decode(text))


def test_default_store_path_sits_next_to_the_config_file(tmp_path: Path) -> None:
    """With a config file but no [store] path, the default broker.db sits beside the file."""
    source = toml_file(tmp_path / "conf" / "broker.toml", "[server]\nport = 1\n")
    assert load_config(source, environ={}).db_path == source.resolve().parent / "broker.db"


def test_relative_paths_from_env_and_flags_stay_relative_to_cwd(tmp_path: Path) -> None:
    """BROKER_DB and --db are typed at a shell: they stay relative to the cwd."""
    source = toml_file(tmp_path / "conf" / "broker.toml", '[store]\npath = "file.db"\n')
    assert load_config(source, environ={"BROKER_DB": "env.db"}).db_path == Path("env.db")
    flagged = load_config(source, environ={}, overrides={"store.path": "flag.db"})
    assert flagged.db_path == Path("flag.db")


def test_relative_key_file_from_env_stays_relative_to_cwd(tmp_path: Path, cwd: Path) -> None:
    """BROKER_KEY_FILE=rel.key with a config file elsewhere reads ./rel.key."""
    text = new_key()
    key_file(cwd / "rel.key", text)
    source = toml_file(tmp_path / "conf" / "broker.toml", "[server]\nport = 1\n")
    config = load_config(source, environ={"BROKER_KEY_FILE": "rel.key"})
    assert key_id(config.require_key()) == key_id(base64.urlsafe_b64decode(text))


def test_relative_key_file_flag_stays_relative_to_cwd(tmp_path: Path, cwd: Path) -> None:
    """--key-file rel.key with a config file elsewhere reads ./rel.key, as --db does."""
    text = new_key()
    key_file(cwd / "rel.key", text)
    source = toml_file(tmp_path / "conf" / "broker.toml", "[server]\nport = 1\n")
    config = load_config(source, environ={}, overrides={"store.key_file": "rel.key"})
    assert key_id(config.require_key()) == key_id(base64.urlsafe_b64decode(text))


# -- OAuth settings -------------------------------------------------------------------------

OAUTH_ENV = {
    "AMOCRM_BASE_URL": "https://example.amocrm.ru",
    "AMOCRM_CLIENT_ID": "client-id",
    "AMOCRM_CLIENT_SECRET": CLIENT_SECRET,
    "AMOCRM_REDIRECT_URI": "https://example.com/cb",
}


def test_require_oauth_returns_the_four_settings() -> None:
    """With all four set, require_oauth hands them over together."""
    oauth = load_config(None, environ=OAUTH_ENV).require_oauth()
    assert oauth == OAuthClientConfig(
        "https://example.amocrm.ru", "client-id", Secret(CLIENT_SECRET), "https://example.com/cb"
    )


@pytest.mark.parametrize("present", [(), ("AMOCRM_BASE_URL",), ("AMOCRM_CLIENT_ID",)])
def test_require_oauth_names_every_missing_setting(present: tuple[str, ...]) -> None:
    """Each missing AMOCRM_* setting is named; the ones that are set are not."""
    config = load_config(None, environ={name: OAUTH_ENV[name] for name in present})
    with pytest.raises(ConfigError) as caught:
        config.require_oauth()
    message = str(caught.value)
    for name in OAUTH_ENV:
        assert (name in message) is (name not in present)


# -- secrets never show ---------------------------------------------------------------------


def full_config(tmp_path: Path) -> tuple[Config, list[str]]:
    text = new_key()
    config = load_config(
        None,
        environ={
            **OAUTH_ENV,
            "BROKER_ENCRYPTION_KEY": text,
            "AMOCRM_ACCESS_TOKEN": ACCESS,
            "AMOCRM_REFRESH_TOKEN": REFRESH,
        },
    )
    raw_key = base64.urlsafe_b64decode(text)
    return config, [CLIENT_SECRET, ACCESS, REFRESH, text, repr(raw_key), raw_key.hex()]


def test_config_repr_and_str_hide_every_secret(tmp_path: Path) -> None:
    """repr/str of a full Config show no client secret, key or bootstrap token."""
    config, secrets = full_config(tmp_path)
    for text in (repr(config), str(config), f"{config}", repr(config.require_oauth())):
        assert_no_leak(text, *secrets)


def test_secret_hides_its_value_in_repr_str_and_format() -> None:
    """A Secret never shows its value, however it is printed; reveal() gives it back."""
    secret = Secret(CLIENT_SECRET)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret)):
        assert_no_leak(text, CLIENT_SECRET)
    assert fingerprint(secret.reveal()) == fingerprint(CLIENT_SECRET)


def test_the_example_config_loads_and_documents_every_setting() -> None:
    """config.example.toml loads, names every setting and its env variable, holds the defaults."""
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    text = example.read_text(encoding="utf-8")
    config = load_config(example, environ={"BROKER_ENCRYPTION_KEY": new_key()})
    for setting in SETTINGS:
        assert f"[{setting.section}]" in text
        assert setting.key in text, setting.dotted
        if setting.env:
            assert setting.env in text, setting.env
    assert config.limits == LimitSettings()
