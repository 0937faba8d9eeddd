"""Deterministic simulation of the refresh protocol: seeded loop, clock, store and amoCRM."""
