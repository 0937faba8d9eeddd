"""The token store: one interface (`api.Store`), the SQLite and PostgreSQL backends, sealing.

Holds the pair sealed with AES-256-GCM, its generation, rotation history and refresh lease,
plus side tables (shared pacing members, OAuth states), backup, re-keying and migration.
Uses the base, the configuration and the pair model; knows no refresh policy and no server.
"""
