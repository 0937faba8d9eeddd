"""The sandbox amoCRM: its OAuth token endpoint, a slice of /api/v4, and the JWTs it hands out.

The upstream every test and the demo run against. It imports nothing of the broker but the
base, so it emulates amoCRM without sharing a line of the code under test.
"""
