"""Builds the optional C fast path (cachescope/_speedups.c); metadata lives in pyproject.toml.

The extension is optional: where it cannot be compiled, cachescope runs in pure Python
(``cachescope.speedups_active()`` says which path is in use).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("cachescope._speedups", ["cachescope/_speedups.c"], optional=True)])
