"""Run the command line interface: `python -m broker`."""

from broker.cli import main

raise SystemExit(main())
