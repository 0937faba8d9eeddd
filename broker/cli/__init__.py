"""The `amo-broker` command: `main(argv) -> exit code`, one module per command group, the demo.

The top of the stack: it may use every part, through the composition root (`broker.service`).
"""
