"""Put back each fixed defect of the refresh protocol and require the proofs to catch it.

Each mutant in MUTANTS.toml is a small patch under this folder that undoes one fix (a defect
docs/reliability.md or issue 22 names). For each, this copies the checkout's tracked files to a
scratch folder, applies the patch there, and runs the tests the manifest names against the
copy (PYTHONPATH points at it, so the copy's `broker` is imported, by subprocesses too). A
mutant must make them fail; one that passes them has survived, and the run fails: the proof no
longer reaches the defect it was written for. A patch that no longer applies fails the run too
(the code moved: regenerate the patch from the fix's own diff).

    .venv/bin/python -m tests.sim.mutants.run            # every mutant, two at a time
    .venv/bin/python -m tests.sim.mutants.run cas_off    # the ones named
    .venv/bin/python -m tests.sim.mutants.run --list

Each mutant's tests first run once on the unpatched copy and must pass there: a mutant
"caught" by a selection that fails anyway (a missing server, a renamed test) proves nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parents[2]
MANIFEST = HERE / "MUTANTS.toml"
# pytest's exit codes that say the selection ran and something failed (1), or timed out in a
# test (pytest-timeout fails the test: also 1). 2-5 mean it never judged the mutant.
CAUGHT = {1}


@dataclass(frozen=True)
class Mutant:
    """One defect put back: its patch, what it undoes, and the tests that must catch it."""

    name: str
    defect: str
    patch: Path
    tests: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    timeout: float = 240.0


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    verdict: str  # caught, SURVIVED, STALE (patch does not apply), BROKEN (tests never ran)
    seconds: float
    detail: str


def load(path: Path = MANIFEST) -> list[Mutant]:
    """Read the manifest: one [[mutant]] table each (name, defect, patch, tests, env)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    mutants = []
    for entry in data.get("mutant", []):
        mutants.append(
            Mutant(
                name=entry["name"],
                defect=entry["defect"],
                patch=HERE / entry["patch"],
                tests=tuple(entry["tests"]),
                env=tuple(sorted(entry.get("env", {}).items())),
                timeout=float(entry.get("timeout", 240)),
            )
        )
    return mutants


def scratch_copy(into: Path) -> None:
    """Copy the checkout's tracked files (and untracked ones not ignored) into `into`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=TOP,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        source = TOP / rel
        if not source.is_file():
            continue  # deleted in the work tree but still in the index
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def judge(mutant: Mutant) -> Outcome:
    """Run one mutant's tests on a scratch copy without its patch (they must pass), then
    with it (they must fail)."""
    baseline = judge_copy(mutant, patched=False)
    if baseline.verdict == "STALE":
        return baseline
    if baseline.verdict != "SURVIVED":  # i.e. the unpatched copy passed: the selection works
        return Outcome(mutant, "BROKEN", baseline.seconds, f"fails unpatched: {baseline.detail}")
    outcome = judge_copy(mutant, patched=True)
    return Outcome(mutant, outcome.verdict, baseline.seconds + outcome.seconds, outcome.detail)


def judge_copy(mutant: Mutant, *, patched: bool) -> Outcome:
    """Copy the checkout, apply the mutant's patch if `patched`, and run its tests there."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        copy = Path(tmp)
        scratch_copy(copy)
        applied = subprocess.run(
            ["git", "apply", "--whitespace=nowarn", str(mutant.patch)],
            cwd=copy,
            capture_output=True,
            text=True,
        )
        if applied.returncode != 0:
            return Outcome(mutant, "STALE", 0.0, applied.stderr.strip().splitlines()[0])
        if not patched:
            subprocess.run(
                ["git", "apply", "-R", str(mutant.patch)], cwd=copy, check=True, capture_output=True
            )
        env = {
            **os.environ,
            **dict(mutant.env),
            "PYTHONPATH": str(copy),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        try:
            ran = subprocess.run(
                [*command, *mutant.tests],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
                timeout=mutant.timeout,
            )
        except subprocess.TimeoutExpired:
            # A mutant that hangs the suite is caught too (CI's timeout would fail it), but
            # say so: a hang is a slower, vaguer signal than an invariant's message.
            return Outcome(mutant, "caught", time.monotonic() - started, "timed out")
    seconds = time.monotonic() - started
    last = (ran.stdout.strip().splitlines() or [""])[-1]
    if ran.returncode == 0:
        return Outcome(mutant, "SURVIVED", seconds, last)
    if ran.returncode in CAUGHT:
        return Outcome(mutant, "caught", seconds, last)
    return Outcome(mutant, "BROKEN", seconds, f"pytest exit {ran.returncode}: {last}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=2, help="mutants judged at once (2)")
    args = parser.parse_args(argv)
    mutants = load()
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:<28} {mutant.defect}")
        return 0
    if args.names:
        unknown = set(args.names) - {m.name for m in mutants}
        if unknown:
            print(f"unknown mutant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in args.names]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(judge, mutants))
    for outcome in outcomes:
        print(
            f"{outcome.verdict:<9} {outcome.mutant.name:<28} {outcome.seconds:6.1f}s  "
            f"{outcome.detail}"
        )
    bad = [o for o in outcomes if o.verdict != "caught"]
    caught = len(outcomes) - len(bad)
    print(f"mutants: {caught} caught, {len(bad)} not, in {time.monotonic() - started:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
