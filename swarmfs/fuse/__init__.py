"""Kernel boundary: the only package that imports pyfuse3.

``operations`` translates FUSE requests into ``fs.Filesystem`` calls and
errors into errno; ``mount`` builds the mount options and runs the session.
Handlers run as trio tasks of ``pyfuse3.main``; only ``FUSEError`` may leave
them, because anything else ends the filesystem (DESIGN.md §8).
"""
