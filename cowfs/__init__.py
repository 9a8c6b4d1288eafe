"""cowfs: copy-on-write unified guest roots over FUSE (Linux-VServer's unification in user space)."""

__version__ = "0.1.0"
