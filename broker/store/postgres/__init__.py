"""The PostgreSQL backend: replicas on many hosts, advisory locks, LISTEN/NOTIFY (psycopg 3)."""
