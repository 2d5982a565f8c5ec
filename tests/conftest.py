"""Fixtures shared by the test modules.

pytest imports this file in its default "prepend" import mode, which first puts this directory
(tests/) on ``sys.path``; so every test module can import the shared helper modules beside it by
name, without editing ``sys.path`` itself:

- ``_helpers``: cache constructions (``make_cache``, ``construct``, ``CONSTRUCTIONS``) and other
  helpers that need no torch;
- ``_kvloop``: labml-style layers (``Attention``, the bare ``KVLayer``) and decode loops
  (``decode``, ``labml_decode``);
- ``_loop``: the tiny reference NeoX model, ``run_decode`` and in-memory OpenTelemetry;
- ``_prom``: a real Prometheus on loopback, and the dashboard/rules helpers;
- ``_ci``: under ``CI=true``, a skip for something missing is a failure (its hooks are here).

Nothing here may import torch at module level (directly or through ``_kvloop``/``_loop``):
tests/test_portable.py runs under this conftest on interpreters without torch
(scripts/test_pythons.sh) and checks that torch is never imported.
"""

from __future__ import annotations


import pytest

from _helpers import CONSTRUCTIONS


@pytest.fixture(params=CONSTRUCTIONS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each cache construction of ``_helpers.CONSTRUCTIONS`` in turn ("bare", then "default");
    build the cache with ``_helpers.construct(kind)``."""
    return request.param


# Under CI=true a skip for something missing fails, in a test or for a whole module (_ci.py).
from _ci import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401

