"""Configuration: the settings table, their parsers, the `[[accounts]]` tables, key files.

Flags > environment > TOML > defaults, resolved once into frozen values (`model`). Uses only
the base (`errors`); knows nothing of the store, the tokens, the traffic or the server.
"""
