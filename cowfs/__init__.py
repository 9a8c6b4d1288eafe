"""cowfs: copy-on-write unified guest roots over FUSE (Linux-VServer's unification)."""

__version__ = "0.1.0"
