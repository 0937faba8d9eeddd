"""Profile the broker's hot path under the 1 KB load: where a request's CPU time goes.

py-spy samples the running `amo-broker serve` (no code change, no restart) while wrk drives
the 1 KB scenario; the collapsed stacks are then bucketed by what they were doing. Buckets
count a sample when any frame of its stack matches, so a nested bucket ("redaction") is also
inside its parent ("logging, all"); the figures are shares of busy CPU samples.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

from bench import measure
from bench.procs import BenchError
from bench.targets import Target

# (label, regex on a frame "function (file:line)"); order is the order of the report.
BUCKETS = (
    ("proxy handler, all (Proxy.handle)", r"^Proxy\.handle \("),
    ("logging, all (structlog + broker/logs.py)", r"structlog/|broker/logs\.py"),
    ("  redaction (Redactor)", r"^Redactor\."),
    ("  JSON rendering (JSONRenderer)", r"^JSONRenderer\."),
    ("  json.dumps", r"^(dumps|JSONEncoder\.\w+) \(.*json/"),
    ("  timestamp (TimeStamper)", r"Stamper"),
    ("  write to the log file (PrintLogger.msg)", r"^PrintLogger\.msg"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    ("pacing / account limiter", r"broker/(limiter|pacing|account_guard)\.py"),
    ("header filtering (proxy_rules)", r"^(request_headers|response_headers|_connection_named)"),
    ("target checks (check_target, resource_of)", r"^(check_target|check_method|resource_of)"),
    ("token lookup (TokenManager.token)", r"^TokenManager\.token \("),
    ("aiohttp client: send + read answer", r"aiohttp/(client|connector|client_reqrep)\.py"),
    ("aiohttp server: respond (prepare/write)", r"aiohttp/web_response\.py"),
    ("aiohttp server: routing", r"aiohttp/web_urldispatcher\.py"),
    ("middlewares (InFlight, json_errors)", r"^(InFlight\.middleware|json_errors|caller_auth) "),
)


def _parse(raw: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks[tuple(frames.split(";"))] += int(count)
    return stacks


def summarise(raw: Path) -> str:
    """Render bucket shares and the top functions (self time) as markdown."""
    everything = _parse(raw)
    # Only the event loop's thread: py-spy does not see aiosqlite's worker blocked in its
    # queue's get() as idle, and would count it as busy all the time.
    stacks = Counter({s: n for s, n in everything.items() if not s[0].startswith("Thread.")})
    total = sum(stacks.values())
    if not total:
        raise BenchError(f"py-spy recorded no samples ({raw})")
    lines = [f"{total:,} samples of the event loop's thread (py-spy's idle ones excluded)", ""]
    lines += ["| bucket | share of CPU |", "|---|---|"]
    for label, pattern in BUCKETS:
        regex = re.compile(pattern)
        hit = sum(n for stack, n in stacks.items() if any(regex.search(f) for f in stack))
        lines.append(f"| {label} | {100 * hit / total:.1f} % |")
    own: Counter[str] = Counter()
    for stack, n in stacks.items():
        own[re.sub(r":\d+\)$", ")", stack[-1])] += n
    lines += ["", "| top functions, self time | share |", "|---|---|"]
    lines += [f"| `{fn}` | {100 * n / total:.1f} % |" for fn, n in own.most_common(25)]
    return "\n".join(lines)


def record(
    broker: Target, path: str, seconds: float, out_dir: Path
) -> tuple[str, dict[str, float]]:
    """Sample `broker` with py-spy during a 1 KB wrk run; return the summary and wrk's numbers."""
    py_spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    if not Path(py_spy).exists():
        raise BenchError(
            "py-spy missing: .venv/bin/pip install py-spy (bench/run.sh --profile does)"
        )
    assert broker.proc is not None  # noqa: S101
    raw = out_dir / f"profile-{broker.name}-1k.txt"
    argv = [py_spy, "record", "--pid", str(broker.proc.pid), "--duration", f"{seconds:g}"]
    # Blocking sampling (py-spy's default): --nonblocking reads stacks while they change and
    # records impossible ones. The pauses slow the broker a little, not its proportions.
    argv += ["--rate", "400", "--format", "raw", "--output", str(raw)]
    sampler = threading.Thread(
        target=subprocess.run,
        args=(argv,),
        kwargs={"capture_output": True, "check": False},
    )
    sampler.start()
    load = measure.wrk(broker, path, connections=32, seconds=seconds + 1)
    sampler.join()
    return summarise(raw), load
