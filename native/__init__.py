"""Bindings (cffi) for Linux system calls that Python 3.11's standard library lacks."""
