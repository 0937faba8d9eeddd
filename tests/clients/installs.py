"""Install the client libraries under test, pinned exactly, into a cache reused between runs.

Each Python library gets a venv of its own (amocrm-api and amocrm-sdk both install a package
named `amocrm`), filled by this interpreter's pip with every distribution pinned and
`--no-deps`, so a run installs exactly what the last one did. Each npm package gets its own
`--prefix`; npm pins the package and keeps its lockfile there. A directory is reused only
when its marker lists exactly the pins asked for; anything else is rebuilt from scratch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = Path(__file__).resolve().parent / "drivers"
CACHE = Path(os.environ.get("BROKER_CLIENTS_CACHE", ROOT / ".clients-cache"))
INSTALL_TIMEOUT = 240
_MARKER = ".pins"
_QUIET = ["--disable-pip-version-check", "--no-input", "-q"]


@dataclass(frozen=True)
class Library:
    """One client library: how to install it, pinned, and the driver that uses it."""

    name: str
    runtime: str  # "python" or "node"
    pins: tuple[str, ...]  # the library first; for Python, then every dependency

    @property
    def home(self) -> Path:
        return CACHE / self.runtime / self.name

    @property
    def driver(self) -> Path:
        suffix = ".py" if self.runtime == "python" else ".js"
        return DRIVERS / f"drive_{self.name.replace('-', '_')}{suffix}"


_HTTPX = ("anyio==4.16.0", "h11==0.16.0", "httpcore==1.0.9", "httpx==0.29.0", "idna==3.20")
_REQUESTS = ("charset-normalizer==3.5.3", "idna==3.20", "requests==2.34.2", "urllib3==2.8.0")
_CERTIFI = "certifi==2026.10.19.post1"
LIBRARIES = (
    Library(
        "aioamocrm",
        "python",
        (
            "aioamocrm==0.1.1",
            *_HTTPX,
            _CERTIFI,
            "annotated-types==0.8.0",
            "pydantic==2.14.4",
            "pydantic-core==2.50.5",
            "typing-inspection==0.4.5",
            "typing-extensions==4.16.0",
        ),
    ),
    Library(
        "amocrm-api-wrapper",
        "python",
        ("amocrm-api-wrapper==1.0.1", *_HTTPX, _CERTIFI, "typing-extensions==4.16.0"),
    ),
    Library("amocrm-api", "python", ("amocrm-api==2.6.1", *_REQUESTS, _CERTIFI, "pyjwt==2.15.1")),
    Library("amocrm-sdk", "python", ("amocrm-sdk==0.4.0", *_REQUESTS, _CERTIFI)),
    Library("amocrm-js", "node", ("amocrm-js@3.6.0",)),
    Library("shevernitskiy-amo", "node", ("@shevernitskiy/amo@0.1.12",)),
)
BY_NAME = {library.name: library for library in LIBRARIES}


class InstallFailed(Exception):
    """A library could not be installed; the message carries the installer's output."""


def ensure(library: Library) -> None:
    """Install `library` into its cache directory unless exactly these pins are there."""
    marker = library.home / _MARKER
    wanted = "\n".join(library.pins) + "\n"
    if library.runtime == "node" and not (shutil.which("node") and shutil.which("npm")):
        raise InstallFailed("the Node libraries need Node (>= 18) and npm on PATH")
    if marker.exists() and marker.read_text(encoding="utf-8") == wanted:
        return
    shutil.rmtree(library.home, ignore_errors=True)
    library.home.parent.mkdir(parents=True, exist_ok=True)
    if library.runtime == "python":
        _run([sys.executable, "-m", "venv", "--without-pip", str(library.home)])
        python = str(library.home / "bin" / "python")
        pip = [sys.executable, "-m", "pip", "--python", python, "install", *_QUIET]
        _run([*pip, "--no-deps", *library.pins])
    else:
        npm = ["npm", "install", "--no-audit", "--no-fund", "--save-exact"]
        _run([*npm, "--prefix", str(library.home), *library.pins])
    # Written last: an interrupted install leaves no marker and is redone next time.
    marker.write_text(wanted, encoding="utf-8")


def command(library: Library) -> tuple[list[str], dict[str, str]]:
    """The command that runs the library's driver, and the environment it needs."""
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    if library.runtime == "python":
        return [str(library.home / "bin" / "python"), str(library.driver)], env
    node = shutil.which("node") or "node"
    return [node, str(library.driver)], {**env, "NODE_PATH": str(library.home / "node_modules")}


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(  # a blocking install, before any event loop runs
            argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallFailed(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise InstallFailed(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
