"""Run the whole benchmark: start everything, measure in interleaved rounds, write the table.

Order matters for fairness. Within a scenario every target runs back to back (direct,
broker, yardstick, nginx), and the whole sequence repeats for each round, rotated by one
each time, so slow drift of the machine (another job, thermal state) lands on every target
alike instead of on whichever ran last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import measure, profile, report
from bench.procs import LOAD_CPU, PROXY_CPU, BenchError, stop_all, wait_http
from bench.targets import Target, python_for_children, start_broker, start_yardstick
from bench.upstream import (
    Upstream,
    nginx_available,
    start_nginx_proxy,
    start_nginx_upstream,
    start_sandbox,
    unsigned_jwt,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 5, quick 2)")
    parser.add_argument("--uvloop", action="store_true", help="also run the broker on uvloop")
    parser.add_argument("--no-storm", action="store_true", help="skip the 1000 x 401 scenario")
    parser.add_argument(
        "--broker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the broker(s), e.g. BROKER_LOG_LEVEL=warning (repeatable)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="only profile broker and yardstick under 1 KB load"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    return args


def _require_tools() -> None:
    missing = [t for t in ("wrk", "taskset", "curl") if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run bench/run.sh (it installs them)")
    if len(os.sched_getaffinity(0)) < 2 or PROXY_CPU not in os.sched_getaffinity(0):
        raise BenchError("needs CPUs 0 and 1: the proxy under test gets a core of its own")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.python = python_for_children()
        self.results: report.Results = []
        self.notes: list[str] = []
        self.token = unsigned_jwt()
        self.header_file = root / "auth.header"
        self.header_file.write_text(f"Authorization: Bearer {self.token}\n")
        self.header_file.chmod(0o600)

    # -- setting up ---------------------------------------------------------------------

    def start_targets(self) -> tuple[Upstream, list[Target]]:
        if nginx_available():
            upstream = start_nginx_upstream(self.root, self.token)
            pair = {"access_token": self.token, "refresh_token": "bench-" + secrets.token_hex(24)}
        else:
            self.warn(
                "nginx not found: the sandbox is the upstream (slow; 1 KB-class only, "
                "no 256 KB, 1 GiB or nginx reference). Install nginx for real numbers."
            )
            upstream, pair = start_sandbox(self.root, self.python, "upstream-sandbox")
            self.token = pair["access_token"]
            self.header_file.write_text(f"Authorization: Bearer {self.token}\n")
        targets = [Target("direct", upstream.url, None, auth=self.token)]
        extra = dict(item.split("=", 1) for item in self.args.broker_env)
        if extra:
            self.notes.append(f"broker settings changed for this run: {', '.join(extra)}")
        targets.append(start_broker(self.python, self.root, upstream, pair, extra=extra))
        if self.args.uvloop:
            # Its own store, seeded from the same pair: both processes read, neither rotates.
            targets.append(
                start_broker(
                    self.python,
                    self.root,
                    upstream,
                    pair,
                    name="broker-uvloop",
                    uvloop=True,
                    extra=extra,
                )
            )
        targets.append(start_yardstick(self.python, self.root, upstream, self.token))
        if upstream.kind == "nginx":
            url, proc = start_nginx_proxy(self.root, upstream, self.token)
            targets.append(Target("nginx", url, proc))
        return upstream, targets

    def warn(self, message: str) -> None:
        print(f"bench: warning: {message}", file=sys.stderr)
        self.notes.append(f"WARNING: {message}")

    # -- measuring ----------------------------------------------------------------------

    def record(self, round_no: int, scenario: str, target: Target, result: dict[str, Any]) -> None:
        if result.get("errors"):
            self.warn(f"round {round_no} {scenario} {target.name}: {result['errors']} errors")
        self.results.append(
            {"round": round_no, "scenario": scenario, "target": target.name, **result}
        )

    def rounds(self, upstream: Upstream, targets: list[Target]) -> None:
        paths, seconds = upstream.paths, self.args.seconds
        proxies = [t for t in targets if t.proc is not None]
        for target in proxies:  # before any load: what a freshly started proxy holds
            self.record(1, "idle", target, measure.idle(target, paths["1k"]))
        print(f"bench: warming up {len(targets)} targets", file=sys.stderr)
        for target in targets:
            measure.wrk(target, paths["1k"], connections=32, seconds=min(2.0, seconds))
        if "1g" in paths:  # the first read of the big file is slower for whoever goes first
            measure.download(targets[0], paths["1g"], self.header_file)
        for n in range(1, self.args.rounds + 1):
            order = targets[n - 1 :] + targets[: n - 1]  # rotated: no target always goes last
            print(f"bench: round {n}/{self.args.rounds}", file=sys.stderr)
            for target in order:
                self.record(
                    n,
                    "1k",
                    target,
                    measure.wrk(target, paths["1k"], connections=32, seconds=seconds),
                )
            if "256k" in paths:
                for target in order:
                    self.record(
                        n,
                        "256k",
                        target,
                        measure.wrk(target, paths["256k"], connections=32, seconds=seconds),
                    )
            for target in order:
                self.record(
                    n,
                    "light",
                    target,
                    measure.wrk(target, paths["1k"], connections=1, seconds=seconds),
                )
            if "1g" in paths:
                for target in order:
                    self.record(
                        n, "1g", target, measure.download(target, paths["1g"], self.header_file)
                    )
            for target in [t for t in order if t in proxies]:
                time.sleep(1.0)  # let the last scenario's buffers go before reading "idle"
                self.record(n, "held", target, measure.held_connections(target, paths["1k"]))

    def storm(self) -> None:
        """1000 requests at once, all with an expired token: one refresh, and how fast after."""
        sandbox, pair = start_sandbox(self.root, self.python)
        broker = start_broker(self.python, self.root, sandbox, pair, name="broker-401")
        path = "/api/v4/account"
        for _ in range(20):
            wait_http(broker.url + path, broker.proc)  # type: ignore[arg-type]
        for n in range(1, self.args.rounds + 1):
            print(f"bench: 1000 x 401, round {n}/{self.args.rounds}", file=sys.stderr)
            self.record(
                n,
                "401",
                Target("broker", broker.url, broker.proc),
                measure.storm(broker, sandbox.url, path),
            )
            time.sleep(1.0)
        broker.proc.stop()  # type: ignore[union-attr]
        sandbox.proc.stop()

    def profile(self, upstream: Upstream, targets: list[Target]) -> str:
        """py-spy the broker and the yardstick under the 1 KB load; bucket where CPU goes."""
        seconds = max(self.args.seconds, 15.0)
        parts = ["# amo-broker hot-path profile (1 KB JSON, 32 connections)", ""]
        for target in targets:
            if target.name not in ("broker", "broker-uvloop", "yardstick"):
                continue
            measure.wrk(target, upstream.paths["1k"], connections=32, seconds=2)
            print(f"bench: profiling {target.name} for {seconds:g} s", file=sys.stderr)
            summary, load = profile.record(target, upstream.paths["1k"], seconds, self.root)
            parts += [f"## {target.name}: {load['rps']:,.0f} req/s under py-spy", "", summary, ""]
        text = "\n".join(parts)
        (RESULTS / "profile.md").write_text(text)
        return text

    # -- reporting ----------------------------------------------------------------------

    def broker_log_note(self) -> None:
        log = self.root / "broker.log"
        if log.exists():
            requests = errors = 0
            with log.open("rb") as lines:
                for line in lines:
                    requests += b'"event": "request"' in line
                    errors += b'"level": "error"' in line
            self.notes.append(
                f"the broker logged {requests:,} `request` events (JSON, info) and {errors:,} "
                "error lines to its log file during the run"
            )

    def write(self, started: float) -> str:
        report.add_derived(self.results)
        table = report.markdown_table(report.summarise(self.results))
        a = self.args
        header = [
            "# amo-broker benchmark: latest run",
            "",
            f"- when: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}, "
            f"{(time.time() - started) / 60:.1f} min",
            f"- machine: {os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {_version('nginx')}",
            f"- rounds: {a.rounds}, {a.seconds:g} s per wrk run, targets interleaved and "
            "rotated each round",
            f"- pinning: proxy under test alone on CPU {PROXY_CPU}; wrk, upstream, sandbox and "
            f"driver on CPU {LOAD_CPU}",
            '- values: median over rounds ("worst": the worst round); ratios: median of '
            "per-round ratios",
            *(f"- {note}" for note in self.notes),
        ]
        text = "\n".join(header) + "\n\n" + table + "\n"
        text += "\n<details><summary>every measurement</summary>\n\n"
        text += report.per_round_table(self.results) + "\n\n</details>\n"
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(self.results, indent=1) + "\n")
        return table


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _version(tool: str) -> str:
    if shutil.which(tool) is None:
        return f"no {tool}"
    done = subprocess.run([tool, "-v"], capture_output=True, text=True, check=False)  # noqa: S603
    return (done.stderr or done.stdout).strip().replace("nginx version: ", "")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="amo-broker-bench-"))
    try:
        _require_tools()
        os.sched_setaffinity(0, {LOAD_CPU})  # this driver is load, not proxy: keep off CPU 1
        bench = Bench(args, root)
        upstream, targets = bench.start_targets()
        if args.profile:
            print(bench.profile(upstream, targets))
            return 0
        bench.rounds(upstream, targets)
        bench.broker_log_note()
        stop_all()  # free the proxy core for the 401 scenario's broker
        if not args.no_storm:
            bench.storm()
        table = bench.write(started)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all()
        if args.keep:
            print(f"bench: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(table)
    print(f"\nbench: wrote {args.out}", file=sys.stderr)
    return 0
