"""Crypto facade: the only package that imports ``cryptography``.

Keys are derived from the swarm key with HKDF under distinct labels
(DESIGN.md §4). Every function here is pure and thread-safe, so the callers run
the expensive ones (chunk encryption) in worker threads.
"""
