"""Content-addressed chunk store on disk: put/get/verify, cache accounting and GC.

Knows chunk ids and opaque ciphertext only; never decrypts. Every function does
blocking file I/O: callers run it in worker threads.
"""
