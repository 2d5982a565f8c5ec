"""cachescope on labml.ai's unmodified GPT-NeoX attention layers, through the pytest fixture."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from cachescope.testing import capture

from _helpers import plugin_autoloaded
from _kvloop import labml_decode

try:
    from labml_nn.neox.model import AttentionLayer
    from labml_nn.neox.utils import cache as labml_cache
except Exception as exc:  # labml_nn is installed with --no-deps: a missing dependency shows up here
    if os.environ.get("CI"):
        raise
    pytest.skip(f"labml_nn.neox is not importable here ({exc!r}); install labml-nn and labml "
                "(scripts/bootstrap.sh test)", allow_module_level=True)


# The cachescope fixture comes from the plugin; load it here unless its entry point does.
pytest_plugins = [] if plugin_autoloaded() else ["cachescope.pytest_plugin"]

# labml's attention wraps its einsums in torch.cuda.amp.autocast, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

N_LAYERS, HIDDEN, HEADS = 4, 32, 4
NAMES = [f"layers.{i}" for i in range(N_LAYERS)]


@pytest.fixture
def layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[AttentionLayer(n_hidden=HIDDEN, n_heads=HEADS) for _ in range(N_LAYERS)])


def test_labml_uses_the_fixture_cache(cachescope) -> None:
    """install() hands labml_nn's get_cache() the fixture's cache, and a nested capture() too."""
    assert labml_cache.get_cache() is cachescope.cache
    with capture() as inner:
        assert labml_cache.get_cache() is inner.cache
    assert labml_cache.get_cache() is cachescope.cache


def test_correct_labml_loop_has_no_violations(cachescope, layers: nn.Sequential) -> None:
    """A correct labml decode loop: no violation, exact op counts, FIFO per layer, same outputs."""
    cachescope.watch(layers, prefix="layers.")
    tokens = torch.randn(1, 8, HIDDEN)
    cached = labml_decode(layers, tokens, prompt_len=5)

    cachescope.assert_no_violations()
    steps = len(cached)
    cachescope.assert_op_counts(family="attn_kv", push=N_LAYERS * steps, pop=N_LAYERS * (steps - 1))
    cachescope.assert_pop_order("attn_kv_0", NAMES)
    cachescope.assert_pop_order("attn_kv", NAMES * (steps - 1))
    cachescope.assert_max_depth("attn_kv", N_LAYERS)
    cachescope.assert_drained(ignore=f"attn_kv_{steps - 1}")  # labml leaves the last step's queue

    # The instrumented cache is a drop-in: recomputing without the cache gives the same outputs.
    labml_cache.get_cache().set("use_cache", False)
    with torch.no_grad():
        full = layers(tokens)
    torch.testing.assert_close(cached[-1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_swapped_pair_is_detected_with_module_names(cachescope, layers: nn.Sequential) -> None:
    """Running layers 1 and 2 in swapped order is caught, naming both layers as watch() named them."""
    cachescope.watch(layers, prefix="layers.")
    tokens = torch.randn(1, 7, HIDDEN)
    with cachescope.expect_violations("owner_mismatch") as caught:
        labml_decode(layers, tokens, prompt_len=4, swap_at=2)

    first = caught[0]
    assert (first.queue, first.step) == ("attn_kv_1", 2)
    assert (first.consumer, first.producer) == ("layers.2", "layers.1")
    assert {(v.consumer, v.producer) for v in caught} >= {("layers.2", "layers.1"),
                                                           ("layers.1", "layers.2")}
    report = first.report()
    assert "Pop by   layers.2 at step 2" in report and "Push by  layers.1 at step 1" in report
    cachescope.assert_pop_order("attn_kv_1", ["layers.0", "layers.2", "layers.1", "layers.3"])
    cachescope.assert_no_violations()  # everything that happened was expected
