"""The container image, built from the Dockerfile and run as the operator's docs run it.

One image build and one hardened container serve the module, against the sandbox amoCRM
(`python -m broker.sandbox`) on the host's loopback: the key and the caller credentials are
made with the image itself (`keygen`, `client add`), owned by uid 10001 with mode 0600 and
mounted at /run/secrets; the store is a named volume at /data; the first pair comes from
`exchange-code` inside the container. The tests after the first share that container and run
in file order: the restart test needs the pair the earlier ones used, the stop test comes last.

Marked `image`: `pytest -m image tests/image` (deploy/image-test.sh; .ci/run). Skipped with the
reason where rootful podman cannot run, failed instead under CI.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_no_leak
from tests.image.podman import (
    IMAGE,
    ROOT,
    Container,
    Secret,
    build_base,
    build_image,
    checked,
    http_get,
    http_post,
    podman,
    require_podman,
    run_detached,
    run_once,
)
from tests.procs import free_port
from tests.test_deploy import compose_broker, compose_env

pytestmark = [pytest.mark.image, pytest.mark.timeout(300)]

IMAGE_UID = 10001
HARDENED = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL")  # noqa: S108 (the container's)
NO_NEW_PRIVILEGES = ("--security-opt", "no-new-privileges")
LEADS = "/api/v4/leads"
# An idle broker stops at once: no request to drain, no refresh in flight.
PROMPT_STOP_SECONDS = 10.0
# A digest of the broker package's Python sources: of the directory in argv[1], else of the
# installed package. Run by the host's and by the image's interpreter alike.
SOURCE_DIGEST = (
    "import hashlib, pathlib, sys\n"
    "if len(sys.argv) > 1:\n"
    "    root = pathlib.Path(sys.argv[1])\n"
    "else:\n"
    "    import broker\n"
    "    root = pathlib.Path(broker.__file__).parent\n"
    "digest = hashlib.sha256()\n"
    "for path in sorted(root.rglob('*.py')):\n"
    "    digest.update(path.relative_to(root).as_posix().encode() + b'\\0' + path.read_bytes())\n"
    "print(digest.hexdigest())\n"
)


@dataclass(frozen=True)
class AmoCRM:
    """The sandbox process's address and OAuth client settings."""

    url: str
    client_id: str
    client_secret: Secret
    redirect_uri: str

    def code(self) -> Secret:
        reply = http_post(self.url, "/_sandbox/code")
        assert reply.status == 200
        return Secret(json.loads(reply.body)["code"])


@dataclass(frozen=True)
class Secrets:
    """The files an operator makes once, and the caller secret `client add` printed."""

    key_file: Path
    clients_file: Path
    env_file: Path
    key: Secret
    caller: Secret

    def mounts(self) -> list[str]:
        """Both secrets where the Dockerfile's defaults look for them, read-only."""
        return [
            *("--volume", f"{self.key_file}:/run/secrets/broker.key:ro"),
            *("--volume", f"{self.clients_file}:/run/secrets/broker-clients.json:ro"),
        ]


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image on the local base (made once per machine by deploy/image-base.sh)."""
    require_podman()
    build_base()
    build_image()
    return IMAGE


@pytest.fixture(scope="module")
def amocrm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmoCRM]:
    """`python -m broker.sandbox` on a free loopback port, for as long as the module runs."""
    log = tmp_path_factory.mktemp("sandbox") / "sandbox.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.sandbox", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "python -m broker.sandbox printed no settings line within 10 s"
        line = proc.stdout.readline()
        assert line, f"python -m broker.sandbox exited {proc.wait(timeout=10)} without a word"
        settings = json.loads(line)
        yield AmoCRM(
            settings["url"],
            settings["client_id"],
            Secret(settings["client_secret"]),
            settings["redirect_uri"],
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def write_private(path: Path, text: str, *, image_user: bool = True) -> None:
    """Write a file mode 0600 from its first byte; the image's user owns it unless told not.

    The broker refuses a key file that others may read, and runs as uid 10001: the docs have
    the operator chown the secrets to it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    if image_user:
        os.chown(path, IMAGE_UID, IMAGE_UID)


@pytest.fixture(scope="module")
def secrets(image: str, amocrm: AmoCRM, tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    """A key from the image's `keygen`, a caller from its `client add` (docs/operations.md)."""
    folder = tmp_path_factory.mktemp("secrets")
    keygen = run_once([], ["keygen"])
    assert keygen.returncode == 0, keygen.stderr[-2000:]
    key_file = folder / "broker.key"
    write_private(key_file, keygen.stdout)
    # As root in a container of its own, the way the docs run it with the operator's uid.
    added = run_once(
        [
            *("--user", "0:0", "--volume", f"{folder}:/out"),
            *("--env", "BROKER_KEY_FILE=", "--env", "BROKER_CLIENT_TOKENS_FILE=/out/clients.json"),
        ],
        ["client", "add", "billing"],
    )
    assert added.returncode == 0, added.stderr[-2000:]
    clients_file = folder / "clients.json"
    os.chown(clients_file, IMAGE_UID, IMAGE_UID)
    clients_file.chmod(0o600)
    env_file = folder / "amocrm.env"  # docs: --env-file amocrm.env
    write_private(
        env_file,
        f"AMOCRM_BASE_URL={amocrm.url}\nAMOCRM_CLIENT_ID={amocrm.client_id}\n"
        f"AMOCRM_CLIENT_SECRET={amocrm.client_secret}\nAMOCRM_REDIRECT_URI={amocrm.redirect_uri}\n",
        image_user=False,  # read by podman on the host, not by the broker
    )
    return Secrets(
        key_file,
        clients_file,
        env_file,
        Secret(keygen.stdout.strip()),
        Secret(added.stdout.strip()),
    )


@pytest.fixture(scope="module")
def served(image: str, amocrm: AmoCRM, secrets: Secrets) -> Iterator[Container]:
    """The image hardened as the docs run it, holding a pair from `exchange-code` inside it."""
    name = f"amo-broker-image-test-{os.getpid()}"
    volume = f"{name}-data"
    container = run_detached(
        name,
        free_port(),
        *HARDENED,
        *NO_NEW_PRIVILEGES,
        *("--volume", f"{volume}:/data"),
        *secrets.mounts(),
        *("--env-file", str(secrets.env_file)),
    )
    try:
        container.wait_healthy()
        exchanged = container.exec("amo-broker", "exchange-code", "-", stdin=amocrm.code() + "\n")
        assert exchanged.returncode == 0, exchanged.stderr[-2000:]
        container.wait_ready()
        yield container
        assert_no_leak(container.logs(), secrets.caller, secrets.key, amocrm.client_secret)
    finally:
        container.remove()
        podman("volume", "rm", "--force", volume)


def bearer(secret: Secret) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def status(container: Container, secret: Secret | None = None) -> dict[str, Any]:
    reply = http_get(container.url, "/status", bearer(secret) if secret else None)
    assert reply.status == 200
    doc: dict[str, Any] = json.loads(reply.body)
    return doc


def events(container: Container) -> list[dict[str, Any]]:
    """The container's JSON log lines, oldest first, over all its runs."""
    parsed = []
    for line in container.logs().splitlines():
        if line.startswith("{"):
            parsed.append(json.loads(line))
    return parsed


def proc_status(container: Container) -> dict[str, str]:
    """/proc/1/status of the container: its first process is `amo-broker serve`."""
    done = container.exec("cat", "/proc/1/status")
    assert done.returncode == 0, done.stderr
    return dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)


def test_image_holds_this_checkouts_code(image: str) -> None:
    """The image's broker package is this checkout's, not a layer cached from an older one."""
    here = subprocess.run(
        [sys.executable, "-c", SOURCE_DIGEST, str(ROOT / "broker")],
        capture_output=True,
        text=True,
        check=True,
    )
    inside = run_once(["--entrypoint", "python"], ["-c", SOURCE_DIGEST])
    assert inside.returncode == 0, inside.stderr[-2000:]
    assert inside.stdout == here.stdout


def test_serves_as_uid_10001_without_privileges_on_a_read_only_root(served: Container) -> None:
    """The serving process is uid/gid 10001 with no capability, no new privileges, a read-only
    root and its store on the /data volume."""
    argv = served.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    assert argv[-2:] == ["serve", ""]
    assert argv[-3].endswith("/amo-broker")
    fields = proc_status(served)
    assert fields["Uid"].split() == [str(IMAGE_UID)] * 4
    assert fields["Gid"].split() == [str(IMAGE_UID)] * 4
    for capabilities in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, capabilities
    assert fields["NoNewPrivs"].strip() == "1"
    written = served.exec("touch", "/etc/amo-broker-was-here")
    assert written.returncode != 0
    assert "Read-only file system" in written.stderr
    store = served.exec("stat", "--format", "%u %F", "/data/broker.db")
    assert store.stdout.split(maxsplit=1) == [str(IMAGE_UID), "regular file\n"]


def test_probes_and_health_check_pass(served: Container) -> None:
    """/healthz and /readyz answer 200 without a caller secret; the image's HEALTHCHECK passes."""
    assert http_get(served.url, "/healthz").status == 200
    ready = http_get(served.url, "/readyz")
    assert ready.status == 200
    assert json.loads(ready.body)["ready"] is True
    checked("healthcheck", "run", served.name)
    assert served.inspect("{{.State.Health.Status}}") == "healthy"


def test_calls_need_the_caller_secret(served: Container, secrets: Secrets) -> None:
    """On 0.0.0.0 a call without the secret `client add` printed is 401; with it, 200."""
    assert http_get(served.url, LEADS).status == 401
    assert http_get(served.url, LEADS, bearer(Secret("not-the-secret"))).status == 401
    assert http_get(served.url, LEADS, bearer(secrets.caller)).status == 200
    assert http_get(served.url, LEADS, {"X-Broker-Key": secrets.caller}).status == 200


def test_expired_token_is_refreshed_and_the_new_pair_survives_a_restart(
    served: Container, secrets: Secrets, amocrm: AmoCRM
) -> None:
    """amoCRM expires the access token: the broker rotates the pair into /data, and a new
    container run of the same volume serves with that generation."""
    before = status(served, secrets.caller)
    assert http_post(amocrm.url, "/_sandbox/expire").status == 200
    assert http_get(served.url, LEADS, bearer(secrets.caller)).status == 200
    rotated = status(served, secrets.caller)
    assert rotated["generation"] == before["generation"] + 1
    assert rotated["refresh_token_fingerprint"] != before["refresh_token_fingerprint"]
    assert rotated["last_refresh_reason"] == "unauthorized"

    _, exit_code = served.stop()
    assert exit_code == 0
    served.start()
    restarted = status(served, secrets.caller)
    kept = ("generation", "refresh_token_fingerprint", "access_token_fingerprint")
    assert {k: restarted[k] for k in kept} == {k: rotated[k] for k in kept}
    assert restarted["state"] == "ok"
    # The old refresh token is spent: only the stored new pair can answer this call.
    assert http_get(served.url, LEADS, bearer(secrets.caller)).status == 200
    assert http_get(served.url, "/readyz").status == 200


def test_stop_is_prompt_and_logged(served: Container) -> None:
    """`podman stop` (SIGTERM) ends an idle broker at once, exit 0, with stopping/stopped."""
    seconds, exit_code = served.stop()
    assert exit_code == 0
    assert seconds < PROMPT_STOP_SECONDS
    names = [event.get("event") for event in events(served)]
    assert names[-2:] == ["stopping", "stopped"]
    stopping = [event for event in events(served) if event.get("event") == "stopping"][-1]
    assert stopping["signal"] == "SIGTERM"


def test_refuses_to_start_on_all_interfaces_without_a_clients_file(
    image: str, secrets: Secrets
) -> None:
    """Without /run/secrets/broker-clients.json the image's defaults exit 2, one line, no
    traceback: on 0.0.0.0 anyone reaching the port could act as the integration."""
    done = run_once(
        [
            *HARDENED,
            *NO_NEW_PRIVILEGES,
            *("--network", "host", "--env", f"BROKER_PORT={free_port()}"),
            *("--volume", f"{secrets.key_file}:/run/secrets/broker.key:ro"),
            *("--env-file", str(secrets.env_file)),
        ],
        [],
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "/run/secrets/broker-clients.json" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_compose_sidecar_settings_start(
    image: str, amocrm: AmoCRM, secrets: Secrets, tmp_path: Path
) -> None:
    """deploy/docker-compose.yml's broker service (loopback, no clients file, the client secret
    from a TOML secret) starts hardened as compose runs it and serves callers without a secret."""
    service = compose_broker()
    for option in ("read_only: true", "- /tmp", "cap_drop: [ALL]", "- no-new-privileges:true"):
        assert option in service
    env = compose_env(service)
    assert (env["BROKER_HOST"], env["BROKER_CLIENT_TOKENS_FILE"]) == ("127.0.0.1", "")
    assert env["BROKER_KEY_FILE"] == "/run/secrets/broker.key"
    assert env["BROKER_CONFIG"] == "/run/secrets/amocrm.toml"
    # The compose file's placeholders give way to the sandbox; BROKER_PORT to a free port,
    # since this container shares the host's network namespace as the app shares the broker's.
    env.update(
        AMOCRM_BASE_URL=amocrm.url,
        AMOCRM_CLIENT_ID=amocrm.client_id,
        AMOCRM_REDIRECT_URI=amocrm.redirect_uri,
    )
    del env["BROKER_PORT"]
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    config = tmp_path / "amocrm.toml"
    write_private(config, f'[amocrm]\nclient_secret = "{amocrm.client_secret}"\n')

    name = f"amo-broker-image-sidecar-{os.getpid()}"
    volume = f"{name}-data"
    container = run_detached(
        name,
        free_port(),
        *HARDENED,
        *("--security-opt", "no-new-privileges:true"),
        *("--volume", f"{volume}:/data"),
        *("--volume", f"{secrets.key_file}:/run/secrets/broker.key:ro"),
        *("--volume", f"{config}:/run/secrets/amocrm.toml:ro"),
        *("--env-file", str(env_file)),
    )
    try:
        container.wait_healthy()
        listening = next(e for e in events(container) if e.get("event") == "listening")
        assert listening["url"] == container.url
        assert listening["caller_auth"] is False
        exchanged = container.exec("amo-broker", "exchange-code", "-", stdin=amocrm.code() + "\n")
        assert exchanged.returncode == 0, exchanged.stderr[-2000:]
        container.wait_ready()
        assert http_get(container.url, LEADS).status == 200
        assert status(container)["state"] == "ok"
        checked("healthcheck", "run", container.name)
        _, exit_code = container.stop()
        assert exit_code == 0
        assert_no_leak(container.logs(), secrets.key, amocrm.client_secret)
    finally:
        container.remove()
        podman("volume", "rm", "--force", volume)
