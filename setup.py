"""Only here to build the cffi extension (native/_build.py); metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/_build.py:ffibuilder"])
