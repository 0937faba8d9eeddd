"""Run the `amo-broker` command in-process through `main(argv)` and read what it printed.

Shared by the CLI tests; their `clean_env` fixture is in tests/fixtures_cli.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from broker.cli.main import main
from broker.logs import redactor

ERROR_PREFIX = "amo-broker: error:"


@dataclass
class Run:
    """What one `main` call returned and printed."""

    code: int
    out: str
    err: str

    def __repr__(self) -> str:
        # Shown by pytest on failure: the exit code and the error lines, scrubbed.
        return f"Run(code={self.code}, errors={redactor.scrub(self.error_lines())!r})"

    @property
    def text(self) -> str:
        return self.out + self.err

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.out)
        assert isinstance(doc, dict)
        return doc

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith(ERROR_PREFIX)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main(list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def assert_user_error(result: Run) -> str:
    """Check a user mistake: exit 2, one error line, last on stderr, no traceback."""
    assert result.code == 2
    assert "Traceback" not in result.err
    lines = result.error_lines()
    assert len(lines) == 1
    assert result.err.rstrip("\n").endswith(lines[0])
    return lines[0]
