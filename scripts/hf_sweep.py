"""cachescope.hf on many architectures: each decoding mode with and without cachescope.hf must
give the same tokens, no violation and no telemetry error (the tests cover five architectures;
this is the wider sweep, about 4 minutes on 2 CPUs). Exits 1 if any case fails.

    .venv/bin/python scripts/hf_sweep.py

Modes a transformers release cannot run for an architecture (without cachescope) print "n/a".
Encoder-decoder caches (T5, BART) are measured only, as docs/hf.md says.
"""
import logging
import os
import sys
import warnings
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
warnings.simplefilter("ignore")
logging.getLogger("cachescope").setLevel(logging.ERROR)   # the measured-only notes
import torch
import cachescope.hf as hf
from prometheus_client import CollectorRegistry
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=256, eos_token_id=None, pad_token_id=0)
ARCHS = {
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256, vocab_size=128, eos_token_id=None, pad_token_id=0),
    "opt": dict(SMALL, ffn_dim=64, word_embed_proj_dim=32),
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "qwen3": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "gemma": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, num_hidden_layers=4),
    "gemma3_text": dict(SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, num_hidden_layers=4),
    "phi3": dict(SMALL, num_key_value_heads=2),
    "falcon": dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, eos_token_id=None, pad_token_id=0),
    "bloom": dict(vocab_size=128, hidden_size=32, n_layer=3, n_head=4, eos_token_id=None, pad_token_id=0),
    "gptj": dict(vocab_size=128, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=256, eos_token_id=None, pad_token_id=0),
    "stablelm": dict(SMALL, num_key_value_heads=2),
    "mixtral": dict(SMALL, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "olmo2": dict(SMALL, num_key_value_heads=2),
    "cohere": dict(SMALL, num_key_value_heads=2),
    "starcoder2": dict(SMALL, num_key_value_heads=2),
    "mistral": dict(SMALL, num_key_value_heads=2, sliding_window=4),
    "llama": dict(SMALL, num_key_value_heads=2),
    "gpt_neox": dict(SMALL),
    "t5": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, eos_token_id=None, pad_token_id=0),
    "bart": dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, eos_token_id=None, pad_token_id=0, forced_eos_token_id=None, decoder_start_token_id=2),
}
padded = torch.tensor([[0, 0, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10]])
mask = (padded != 0).long()
plain_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
MODES = {
    "greedy": lambda m: m.generate(plain_ids, max_new_tokens=10),
    "beam": lambda m: m.generate(plain_ids, max_new_tokens=6, num_beams=3),
    "static": lambda m: m.generate(plain_ids, max_new_tokens=8, cache_implementation="static"),
    "padded": lambda m: m.generate(padded, attention_mask=mask, max_new_tokens=6),
    "padded-static": lambda m: m.generate(padded, attention_mask=mask, max_new_tokens=6, cache_implementation="static"),
    "sampling": lambda m: (torch.manual_seed(1), m.generate(plain_ids, max_new_tokens=8, do_sample=True, top_k=20))[1],
}
bad = 0
for arch, kw in ARCHS.items():
    try:
        cfg = AutoConfig.for_model(arch, **kw)
        if hasattr(cfg, "initializer_range"):
            cfg.initializer_range = 0.5
        torch.manual_seed(0)
        cls = AutoModelForSeq2SeqLM if arch in ("t5", "bart") else AutoModelForCausalLM
        model = cls.from_config(cfg).eval()
    except Exception as e:
        print(f"{arch:12s} SKIP build: {type(e).__name__}: {str(e)[:100]}")
        continue
    for mode, fn in MODES.items():
        try:
            with torch.no_grad():
                exp = fn(model).tolist()
        except Exception as e:
            print(f"{arch:12s} {mode:14s} n/a (transformers: {type(e).__name__}: {str(e)[:80]})")
            continue
        rec = hf.install(registry=CollectorRegistry(), tracing=False)
        try:
            with torch.no_grad():
                got = fn(model).tolist()
        except Exception as e:
            got = f"RAISED {type(e).__name__}: {e}"
        finally:
            hf.uninstall(); rec.close()
        ok = got == exp and not rec.violations and not rec.telemetry_errors
        bad += not ok
        if not ok:
            print(f"{arch:12s} {mode:14s} FAIL same={got == exp} violations={[(v.kind, v.step, v.queue) for v in rec.violations[:3]]} errors={rec.telemetry_errors}")
    print(f"{arch:12s} done")
print(f"{bad} failing case(s)")
sys.exit(1 if bad else 0)
