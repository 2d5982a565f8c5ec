"""Shared test helpers that need no torch at import time (tests/conftest.py imports this module,
and conftest.py is loaded for tests/test_portable.py too, which must run where torch is absent).

Torch-using helpers live beside it: ``_kvloop`` (labml-style attention layers and decode loops),
``_loop`` (the tiny reference NeoX model, OpenTelemetry in memory); ``_prom`` runs a real
Prometheus. Test modules import them by name (``from _helpers import ...``): pytest's default
"prepend" import mode puts this directory on ``sys.path`` when it imports tests/conftest.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from cachescope import InstrumentedCache

_names = itertools.count()


def exporters_available() -> bool:
    """Whether ``cachescope.metrics`` and ``cachescope.tracing`` exist (default construction works)."""
    return all(importlib.util.find_spec(f"cachescope.{m}") is not None for m in ("metrics", "tracing"))


def make_cache(exporters: bool = False, **options: Any) -> InstrumentedCache:
    """An ``InstrumentedCache``; without ``exporters`` no metrics/tracing sinks are attached."""
    if exporters:
        options.setdefault("name", f"test-{next(_names)}")
        return InstrumentedCache(**options)
    return InstrumentedCache(metrics=False, tracing=False, **options)


# Cache constructions every behavioural test should hold for: without exporters always, and the
# default construction (metrics + tracing sinks attached) once those modules exist. The ``kind``
# fixture of tests/conftest.py runs a test once per construction.
CONSTRUCTIONS = ["bare"] + (["default"] if exporters_available() else [])


def construct(kind: str, **options: Any) -> InstrumentedCache:
    return make_cache(exporters=(kind == "default"), **options)


def plugin_autoloaded() -> bool:
    """Whether pytest loads cachescope's plugin itself (package installed with its pytest11 entry point)."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "cachescope.pytest_plugin"
               for ep in importlib.metadata.entry_points(group="pytest11"))


def save_tiny_neox_checkpoint(path: Path) -> Path:
    """Save a small seeded GPT-NeoX checkpoint with transformers (config.json + model.safetensors:
    3 layers, hidden 32, vocab 128) to ``path`` and return it; skips the test without transformers."""
    transformers = pytest.importorskip("transformers")
    import torch
    config = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64,
        use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).eval().save_pretrained(path)
    return path



def serve_scrape_and_stop(args: list[str], cwd: Any, env: dict[str, str], until: str,
                          timeout: float = 60) -> tuple[int, str, str, str]:
    """Run ``python -m cachescope run ... --serve --metrics-port 0`` (``args``), read the port it
    announces on stderr, scrape its ``/metrics`` until a line matches the regex ``until``, then
    SIGTERM it. Returns ``(exit status, stdout, stderr, the last page scraped)``; the process is
    killed if anything fails on the way."""
    import re
    import selectors
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    serving = re.compile(r"cachescope: serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
    proc = subprocess.Popen([sys.executable, "-m", "cachescope", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        seen = ""
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1):
                line = proc.stderr.readline()
                seen += line
                m = serving.search(line)
                port = int(m.group(1)) if m else None
        assert port, f"no serving line; stderr so far: {seen!r}"
        body = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            if re.search(until, body):
                break
            time.sleep(0.2)
        assert re.search(until, body), f"no line matching {until!r} in /metrics:\n{body[:2000]}"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err, body
