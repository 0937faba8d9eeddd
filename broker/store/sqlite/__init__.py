"""The SQLite backend: one host, one file, WAL with synchronous=FULL."""
