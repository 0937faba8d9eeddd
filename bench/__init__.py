"""The amo-broker benchmark: the broker against direct, a minimal aiohttp proxy and nginx.

`bench/run.sh` is the one entry point; see bench/README.md for what is measured and how.
"""
