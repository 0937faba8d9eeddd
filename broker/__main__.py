"""Run the command line interface: `python -m broker`."""

from broker.cli.main import main

raise SystemExit(main())
