"""Traffic to amoCRM: the pace schedule and queue, shared pacing, the 429/403 guard, the limiter.

Keeps one account inside amoCRM's limits. Uses the store (shared pacing), the configuration
and the base; knows no tokens.
"""
