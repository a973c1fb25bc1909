"""Everything `keyd run` imports: the socket server, the API, the key store and its refresher, Vault.

Nothing here imports keyd.ops or keyd.bench (tests/unit/test_layout.py checks it).
"""
