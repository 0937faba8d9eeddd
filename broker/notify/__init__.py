"""Tell operators of state changes: detect transitions, claim them in the store, post them.

detect.py is pure (successive snapshots in, events out); message.py shapes and signs a body;
deliver.py posts in the background with retries; watch.py polls the running accounts and ties
them together. Uses the server's accounts, the store's claims, the config; nothing above.
"""
