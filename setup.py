"""A shim for tools that still call setup.py: the package's metadata is in pyproject.toml.

Reproducible installs use the verified lock: `pip install -r requirements.txt -c constraints.txt`
(what `make` does).
"""
from setuptools import setup

setup()
