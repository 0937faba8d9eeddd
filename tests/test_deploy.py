"""Consistency of the deployment files with the code: Dockerfile, compose, Kubernetes, systemd.

Each deploy file is read as text (PyYAML is not a dependency): the settings each one gives
the broker are checked against config.SETTINGS and resolved by load_config itself, ports and
paths against the defaults, probe commands run against a real broker, and the CLI commands
they mention against the parser. A renamed setting or route fails here, not in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.cli.main import _parser
from broker.config.keyfile import write_key_file
from broker.config.load import SETTINGS, load_config
from broker.config.model import BOOTSTRAP_ACCESS_ENV, BOOTSTRAP_REFRESH_ENV, KEY_ENV, Config
from broker.errors import ConfigError
from broker.lifecycle import DRAIN_SECONDS
from broker.service import build_app, caller_registry, open_runtime
from broker.store.sealing import new_key
from broker.tokens.endpoint import REQUEST_FACTOR
from broker.tokens.landing import SETTLE_SECONDS
from tests.conftest import Broker, ConfigFactory

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "amo-broker.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "amo-broker.env.example"

KNOWN_ENV = {s.env for s in SETTINGS if s.env} | {
    BOOTSTRAP_ACCESS_ENV,
    BOOTSTRAP_REFRESH_ENV,
    KEY_ENV,
    "BROKER_CONFIG",
}
DEFAULT_PORT = next(s.default for s in SETTINGS if s.env == "BROKER_PORT")
IMAGE_UID = 10001
# SIGTERM drains for DRAIN_SECONDS, then waits for a refresh in flight: up to REQUEST_FACTOR
# refresh timeouts, then retries a pair the store refused for SETTLE_SECONDS before sealing it
# in a rescue file (docs/operations.md: "a stop timeout of at least 80 s").
REFRESH_TIMEOUT = next(s.default for s in SETTINGS if s.env == "BROKER_REFRESH_TIMEOUT")
MIN_STOP_SECONDS = DRAIN_SECONDS + REQUEST_FACTOR * REFRESH_TIMEOUT + SETTLE_SECONDS


# -- reading the files ---------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages = re.split(r"(?m)^FROM ", text)
    final = stages[-1]
    result = []
    for line in final.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S*)", rest)))
    return env


def dockerfile_value(instruction: str) -> str:
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert len(values) == 1, f"expected one {instruction}"
    return values[0]


def yaml_block(text: str, start: str, end: str | None) -> str:
    """The lines from the first line matching `start` up to the next matching `end`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(start, line))
    rest = lines[first + 1 :]
    stop = next((i for i, line in enumerate(rest) if end and re.match(end, line)), len(rest))
    return "\n".join(lines[first : first + 1 + stop])


def compose_broker() -> str:
    return yaml_block(COMPOSE.read_text(), r"^  broker:", r"^  \S")


def compose_app() -> str:
    return yaml_block(COMPOSE.read_text(), r"^  app:", r"^  \S")


def compose_env(block: str) -> dict[str, str]:
    env = yaml_block(block, r"^    environment:", r"^    \S")
    return {
        k: v.strip().strip('"') for k, v in re.findall(r"(?m)^ {6}([A-Z_][A-Z0-9_]*): ?(.*)$", env)
    }


def k8s_broker() -> str:
    text = (K8S / "deployment.yaml").read_text()
    return yaml_block(text, r"^      initContainers:", r"^      containers:")


def k8s_env(block: str) -> dict[str, str | None]:
    """name -> literal value (None when it comes from a secretKeyRef)."""
    env: dict[str, str | None] = {}
    for match in re.finditer(
        r"(?m)^ +- name: ([A-Z_][A-Z0-9_]*)\n +(value: ?(.*)|valueFrom:)$", block
    ):
        name, value = match.group(1), match.group(3)
        env[name] = None if value is None else value.strip().strip('"')
    return env


def unit_lines() -> list[tuple[str, str]]:
    return [
        (key, value)
        for key, _, value in (
            line.partition("=")
            for line in UNIT.read_text().splitlines()
            if line and not line.startswith(("#", "["))
        )
    ]


def unit_env() -> dict[str, str]:
    return dict(v.split("=", 1) for k, v in unit_lines() if k == "Environment")


def env_example() -> dict[str, str]:
    return dict(re.findall(r"(?m)^#?([A-Z_][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text()))


def probe_commands() -> dict[str, list[str]]:
    """Every exec probe: the Dockerfile's HEALTHCHECK and the Kubernetes exec probes."""
    probes = {"docker": json.loads(dockerfile_value("HEALTHCHECK").split(" CMD ", 1)[1])}
    for match in re.finditer(r"(?m)^ {10}(\w+Probe):\n.*\n +command: (\[.*\])$", k8s_broker()):
        probes[match.group(1)] = json.loads(match.group(2))
    return probes


def all_deploy_text() -> str:
    files = [DOCKERFILE, COMPOSE, UNIT, ENV_EXAMPLE, *sorted(K8S.glob("*.yaml"))]
    return "\n".join(p.read_text() for p in files)


def resolve(env: dict[str, str], tmp_path: Path) -> Config:
    """Load the configuration the broker would see with `env` (secret files made real)."""
    environ = dict(env)
    key_file = tmp_path / "broker.key"
    if not key_file.exists():
        write_key_file(key_file, new_key())
    if environ.get("BROKER_KEY_FILE"):
        environ["BROKER_KEY_FILE"] = str(key_file)
    if environ.get("BROKER_CONFIG"):
        toml = tmp_path / "amocrm.toml"
        toml.write_text('[amocrm]\nclient_secret = "s"\n')
        environ["BROKER_CONFIG"] = str(toml)
    if environ.get("BROKER_DB"):
        environ["BROKER_DB"] = str(tmp_path / Path(environ["BROKER_DB"]).name)
    return load_config(None, environ=environ)


# -- settings ------------------------------------------------------------------------------


def test_every_broker_env_var_in_deploy_files_is_a_setting() -> None:
    """Each AMOCRM_*/BROKER_* name given to the broker anywhere in deploy/ is one it reads."""
    names = (
        set(dockerfile_env())
        | set(compose_env(compose_broker()))
        | set(k8s_env(k8s_broker()))
        | set(unit_env())
        | set(env_example())
    )
    broker_names = {n for n in names if n.startswith(("AMOCRM_", "BROKER_"))}
    assert broker_names - KNOWN_ENV == set()
    mentioned = set(re.findall(r"\b((?:AMOCRM|BROKER)_[A-Z0-9_]+)\b", all_deploy_text()))
    assert mentioned - KNOWN_ENV == set()


def test_toml_secrets_written_by_the_instructions_load(tmp_path: Path) -> None:
    """The TOML the compose and systemd instructions have you write is accepted by load_config."""
    printf = re.search(r"printf '(.*?)'", COMPOSE.read_text())
    assert printf is not None
    toml = tmp_path / "amocrm.toml"
    toml.write_text(printf.group(1).replace("\\n", "\n").replace("%s", "secret"))
    assert load_config(toml, environ={}).client_secret is not None
    unit_toml = re.search(r"\[(\w+)\] (\w+) = ", UNIT.read_text())
    assert unit_toml is not None
    section, key = unit_toml.groups()
    assert any(s.section == section and s.key == key for s in SETTINGS)


def test_image_defaults_refuse_to_serve_without_caller_credentials(tmp_path: Path) -> None:
    """The image listens beyond loopback and requires the clients file: serving without it fails."""
    env = dockerfile_env()
    config = resolve(env, tmp_path)
    assert config.host == "0.0.0.0"
    assert not config.loopback_only
    assert config.client_tokens_file is not None
    with pytest.raises(ConfigError, match="clients file"):
        caller_registry(config, insecure_no_client_auth=False)
    without = resolve({**env, "BROKER_CLIENT_TOKENS_FILE": ""}, tmp_path)
    with pytest.raises(ConfigError, match="refusing to listen"):
        caller_registry(without, insecure_no_client_auth=False)


@pytest.mark.parametrize("target", ["compose", "kubernetes", "systemd"])
def test_sidecar_configs_resolve_to_loopback_without_client_auth(
    target: str, tmp_path: Path
) -> None:
    """Image defaults overlaid with each target's env resolve to a loopback broker that starts."""
    if target == "compose":
        env = {**dockerfile_env(), **compose_env(compose_broker())}
    elif target == "kubernetes":
        values = k8s_env(k8s_broker())
        env = {**dockerfile_env(), **{k: v for k, v in values.items() if v is not None}}
        env[KEY_ENV] = new_key()  # from the Secret
        env["AMOCRM_CLIENT_SECRET"] = "s"  # from the Secret
    else:
        env = {**unit_env(), **{k: v for k, v in env_example().items()}}
        env = {
            k: v.replace("%S", "/var/lib").replace("%d", "/cred").replace("%t", "/run")
            for k, v in env.items()
            if not k.startswith("BROKER_UNIX")
        }
        env.pop("BROKER_CLIENT_TOKENS_FILE", None)  # commented out in the example
    config = resolve(env, tmp_path)
    assert config.key is not None
    config.require_oauth()
    assert config.host == "127.0.0.1"
    assert config.port == DEFAULT_PORT
    assert config.loopback_only
    assert caller_registry(config, insecure_no_client_auth=False) is None


# -- ports, paths, users, stop timeouts ----------------------------------------------------


def test_ports_match_the_default() -> None:
    """EXPOSE, BROKER_PORT, containerPort and the app's base URL all use the default port."""
    assert dockerfile_value("EXPOSE") == str(DEFAULT_PORT)
    assert dockerfile_env()["BROKER_PORT"] == str(DEFAULT_PORT)
    assert compose_env(compose_broker())["BROKER_PORT"] == str(DEFAULT_PORT)
    assert compose_env(compose_app())["AMOCRM_BASE_URL"] == f"http://127.0.0.1:{DEFAULT_PORT}"
    assert f"containerPort: {DEFAULT_PORT}" in k8s_broker()
    assert k8s_env(k8s_broker())["BROKER_PORT"] == str(DEFAULT_PORT)
    app = (K8S / "deployment.yaml").read_text().split("      containers:")[1]
    assert f"value: http://127.0.0.1:{DEFAULT_PORT}" in app
    assert env_example()["BROKER_PORT"] == str(DEFAULT_PORT)


def test_store_path_is_on_the_persistent_volume() -> None:
    """BROKER_DB is in the image's VOLUME, the compose volume, the PVC and the StateDirectory."""
    data = str(Path(dockerfile_env()["BROKER_DB"]).parent)
    assert json.loads(dockerfile_value("VOLUME")) == [data]
    assert f"broker-data:{data}" in compose_broker()
    assert Path(compose_env(compose_broker())["BROKER_DB"]).parent == Path(data)
    assert Path(str(k8s_env(k8s_broker())["BROKER_DB"])).parent == Path(data)
    assert re.search(rf"name: broker-data\n +mountPath: {data}\n", k8s_broker())
    assert "claimName: amo-broker-data" in (K8S / "deployment.yaml").read_text()
    assert "name: amo-broker-data" in (K8S / "pvc.yaml").read_text()
    state = dict(unit_lines())["StateDirectory"]
    assert unit_env()["BROKER_DB"] == f"%S/{state}/broker.db"


def test_image_user_is_the_one_the_manifests_expect() -> None:
    """The image runs as uid 10001, as the k8s securityContext and the compose chown assume."""
    assert dockerfile_value("USER") == f"{IMAGE_UID}:{IMAGE_UID}"
    assert f"runAsUser: {IMAGE_UID}" in k8s_broker()
    assert f"fsGroup: {IMAGE_UID}" in (K8S / "deployment.yaml").read_text()
    assert f"chown {IMAGE_UID}:{IMAGE_UID}" in COMPOSE.read_text()
    assert "readOnlyRootFilesystem: true" in k8s_broker()
    assert "read_only: true" in compose_broker()


def test_stop_timeouts_outlast_drain_and_a_refresh() -> None:
    """Every service manager waits longer than the drain plus a refresh in flight."""
    grace = re.search(r"stop_grace_period: (\d+)s", compose_broker())
    k8s = re.search(r"terminationGracePeriodSeconds: (\d+)", (K8S / "deployment.yaml").read_text())
    unit = re.fullmatch(r"(\d+)s", dict(unit_lines())["TimeoutStopSec"])
    assert grace and k8s and unit
    for seconds in (grace.group(1), k8s.group(1), unit.group(1)):
        assert int(seconds) >= MIN_STOP_SECONDS


def test_kubernetes_runs_one_replica_as_a_native_sidecar() -> None:
    """replicas 1, Recreate, and the broker an init container with restartPolicy Always."""
    text = (K8S / "deployment.yaml").read_text()
    assert re.search(r"(?m)^  replicas: 1$", text)
    assert re.search(r"(?m)^    type: Recreate$", text)
    assert re.search(r"(?m)^          restartPolicy: Always$", k8s_broker())
    kustomization = (K8S / "kustomization.yaml").read_text()
    assert "- deployment.yaml" in kustomization
    assert "- pvc.yaml" in kustomization
    assert "secret.example.yaml\n" not in kustomization.split("resources:")[1]


def test_kubernetes_secret_keys_match_the_deployment() -> None:
    """Every secretKeyRef in the deployment names a key of the example Secret."""
    refs = re.findall(r"name: (\S+)\n +key: (\S+)", k8s_broker())
    secret = (K8S / "secret.example.yaml").read_text()
    name = re.search(r"(?m)^  name: (\S+)$", secret)
    assert refs and name
    for ref_name, key in refs:
        assert ref_name == name.group(1)
        assert re.search(rf"(?m)^  {key}: ", secret)


# -- probes, routes, commands ----------------------------------------------------------------


def test_probes_ask_for_health_routes_the_app_serves(broker: Broker) -> None:
    """Each probe requests /healthz or /readyz, and those are GET routes of the app."""
    routes = {
        r.resource.canonical
        for r in broker.client.app.router.routes()
        if r.method == "GET" and r.resource is not None
    }
    for name, command in probe_commands().items():
        paths = set(re.findall(r"'(/\w+)'", command[-1]))
        assert paths and paths <= {"/healthz", "/readyz"} & routes, name
    assert "/readyz" in str(probe_commands()["readinessProbe"])


async def run_probe(command: list[str], port: int) -> int:
    env = {**os.environ, "BROKER_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


async def test_probe_commands_pass_against_a_live_broker(broker: Broker) -> None:
    """Every exec probe exits 0 against a broker holding a usable token."""
    port = broker.client.port
    assert port is not None
    for name, command in probe_commands().items():
        assert command[0] == "python", name
        assert await run_probe(command, port) == 0, name


async def test_readiness_probe_fails_without_tokens(
    make_config: ConfigFactory, aiohttp_client: Callable[..., object]
) -> None:
    """The readiness probe exits non-zero while the store holds no pair; liveness passes."""
    config = make_config()
    async with open_runtime(config) as runtime:
        client = await aiohttp_client(build_app(runtime, config, proactive=False))  # type: ignore[operator]
        port = client.port  # type: ignore[attr-defined]
        probes = probe_commands()
        assert await run_probe(probes["readinessProbe"], port) != 0
        assert await run_probe(probes["livenessProbe"], port) == 0


def commands_in(text: str) -> set[str]:
    """Subcommands of amo-broker invoked in shell lines and manifests of `text`."""
    used = set(
        re.findall(
            r"(?:/bin/amo-broker|amo-broker:[\w.]+|exec \S+ amo-broker|`amo-broker) ([a-z][a-z-]*)",
            text,
        )
    )
    used |= set(re.findall(r"compose run (?:-\S+ )*broker ([a-z][a-z-]*)", text))
    used |= set(re.findall(r'args: \["([a-z-]+)"\]', text))
    return used


def fenced_shell(markdown: str) -> str:
    """The text inside the ``` fences of a markdown document."""
    return "\n".join(re.findall(r"(?ms)^ *```[a-z]*\n(.*?)^ *```", markdown))


def cli_commands() -> set[str]:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return set(sub.choices or {})  # type: ignore[arg-type]


def test_cli_commands_in_deploy_files_exist() -> None:
    """Every `amo-broker COMMAND` in deploy/ and the Docker CMD is a subcommand of the CLI."""
    assert json.loads(dockerfile_value("ENTRYPOINT")) == ["amo-broker"]
    used = commands_in(all_deploy_text()) | {json.loads(dockerfile_value("CMD"))[0]}
    assert {"serve", "keygen", "import", "exchange-code", "refresh"} <= used
    assert used - cli_commands() == set()


@pytest.mark.parametrize("doc", ["operations.md", "migration.md", "oauth-setup.md"])
def test_cli_commands_in_the_handbook_exist(doc: str) -> None:
    """Every `amo-broker COMMAND` in the docs' code blocks is a subcommand of the CLI."""
    shell = fenced_shell((ROOT / "docs" / doc).read_text())
    # "docker exec amo-broker amo-broker CMD": the first is a container's name.
    used = set(re.findall(r"(?m)(?:^|[\s/(])amo-broker (?!amo-broker)([a-z][a-z-]*)", shell))
    assert used
    assert used - cli_commands() == set()


# -- external tools ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this venv's amo-broker)."""
    exe = Path(sys.executable).parent / "amo-broker"
    if not exe.exists():
        pytest.skip("amo-broker is not installed in this venv")
    unit = tmp_path / "amo-broker.service"
    unit.write_text(UNIT.read_text().replace("/opt/amo-broker/bin/amo-broker", str(exe)))
    result = subprocess.run(
        ["systemd-analyze", "--man=no", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # verify exits 0 on an unknown key or a bad value, only warning on stderr.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_unit_passes_the_key_as_a_credential() -> None:
    """The key and client secret come from LoadCredential=, never from Environment= values."""
    lines = unit_lines()
    credentials = [v.split(":", 1)[0] for k, v in lines if k == "LoadCredential"]
    assert credentials == ["broker.key", "amocrm.toml"]
    env = unit_env()
    assert env["BROKER_CONFIG"] == "%d/amocrm.toml"
    assert KEY_ENV not in env and "AMOCRM_CLIENT_SECRET" not in env
    assert "AMOCRM_CLIENT_SECRET" not in env_example()
    copy = dict(lines)["ExecStartPre"].split()
    assert copy[-2:] == ["%d/broker.key", env["BROKER_KEY_FILE"]]
    assert dict(lines)["DynamicUser"] == "yes"
