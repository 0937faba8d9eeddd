#!/usr/bin/env bash
# Benchmark amo-broker on loopback against direct, a minimal aiohttp proxy and nginx.
#
#   bench/run.sh            # full run: 3 interleaved rounds, about 5 minutes
#   bench/run.sh --quick    # one short round: a smoke run
#   bench/run.sh --help     # every option (--uvloop, --rounds, --seconds, --keep, ...)
#
# Installs wrk, nginx and curl with apt when they are missing (as root), builds .venv when
# it is absent, then runs `python -m bench`. Writes bench/results/latest.md.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

die() {
	echo "bench: error: $*" >&2
	exit 2
}

apt_install() {
	command -v apt-get >/dev/null || return 1
	[[ $(id -u) -eq 0 ]] || return 1
	if [[ -z ${apt_updated:-} ]]; then
		apt-get update -qq >/dev/null || return 1
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
	echo "bench: installing ${missing[*]} with apt" >&2
	apt_install "${missing[@]}" || die "cannot install ${missing[*]}: install them (Debian: apt-get install ${missing[*]})"
fi
if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
	echo "bench: installing nginx with apt" >&2
	# Without nginx the bench still runs, on the sandbox, and says so in its report.
	apt_install nginx || echo "bench: warning: cannot install nginx; falling back to the sandbox" >&2
fi

if [[ ! -x .venv/bin/python ]]; then
	echo "bench: creating .venv" >&2
	{ python3 -m venv .venv && .venv/bin/pip install -q -e .; } || die "cannot build .venv (python3 -m venv .venv && .venv/bin/pip install -e .)"
fi
# Bench-only tools go into .venv on demand, never into pyproject.toml.
for arg in "$@"; do
	if [[ $arg == --uvloop ]] && ! .venv/bin/python -c 'import uvloop' 2>/dev/null; then
		echo "bench: installing uvloop into .venv" >&2
		.venv/bin/pip install -q uvloop || die "cannot install uvloop into .venv"
	fi
	if [[ $arg == --profile ]] && [[ ! -x .venv/bin/py-spy ]]; then
		echo "bench: installing py-spy into .venv" >&2
		.venv/bin/pip install -q py-spy || die "cannot install py-spy into .venv"
	fi
done

# 1000 concurrent connections in the 401 scenario: raise the descriptor limit if we may.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The driver stops what it starts; this is the backstop if the driver itself is killed.
# Every process it starts is listed here, and only those are ever signalled.
state="$(mktemp -d)"
export BENCH_PIDS_FILE="$state/pids"
child=""
# shellcheck disable=SC2317 # only ever called by the EXIT trap, which shellcheck 0.9 cannot see
cleanup() {
	if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
	if [[ -f $BENCH_PIDS_FILE ]]; then
		while read -r pid; do
			if kill -0 "$pid" 2>/dev/null; then
				kill -TERM -- "-$pid" 2>/dev/null || true
			fi
		done <"$BENCH_PIDS_FILE"
	fi
	rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

.venv/bin/python -m bench "$@" &
child=$!
status=0
wait "$child" || status=$?
child=""
exit "$status"
