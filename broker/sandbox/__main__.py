"""Run the sandbox amoCRM standalone: `python -m broker.sandbox [--port N]`."""

from broker.sandbox.server import main

raise SystemExit(main())
