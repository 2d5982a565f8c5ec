"""Reference GPT-NeoX (issue 3): config presets, model, labml-style decode loop, HF loader."""

from cachescope.neox.config import PRESETS, NeoXConfig
from cachescope.neox.generate import Decoder, generate, logits_for
from cachescope.neox.hf import CheckpointError, load_hf_checkpoint
from cachescope.neox.model import NeoXModel

__all__ = [
    "CheckpointError",
    "Decoder",
    "NeoXConfig",
    "NeoXModel",
    "PRESETS",
    "generate",
    "load_hf_checkpoint",
    "logits_for",
]
