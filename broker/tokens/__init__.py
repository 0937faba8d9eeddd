"""The token core: the token endpoint client and the manager that keeps an account's pair valid.

Single-flight refresh, the proactive loop, the lease across processes, long-lived tokens and
the import of a pair a person gives. Uses the store, the configuration and the base; never the
server, and never the traffic part (pacing knows no tokens, tokens know no pacing).
"""
