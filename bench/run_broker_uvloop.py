"""Run `amo-broker` on uvloop: install uvloop's event loop policy, then the normal CLI.

The broker has no loop switch of its own; `asyncio.run` in broker.cli.main picks up the policy.
Usage is the CLI's: `python -m bench.run_broker_uvloop serve …`.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from broker.cli.main import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    raise SystemExit(main(sys.argv[1:]))
