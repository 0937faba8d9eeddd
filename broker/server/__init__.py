"""The HTTP side: the aiohttp app, middlewares, caller authentication, routing, the proxy and
its rules, the OAuth callback, /status (and its HTML page) and /metrics.

Uses the tokens, traffic, store and configuration parts; nothing below imports it.
"""
