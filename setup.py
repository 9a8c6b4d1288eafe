"""Only here to build the cffi extensions (native/_*build.py); metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/_build.py:ffibuilder", "native/_uring_build.py:ffibuilder"])
