"""``cachescope run --backend hf``: transformers' own ``generate`` on a cache checked by
``cachescope.hf``.

The model is a ``transformers.GPTNeoXForCausalLM``: for ``--preset NAME``, the reference
``NeoXModel`` of that preset (its seeded random weights) converted to Hugging Face names, so
both backends decode the same model; for ``--checkpoint DIR``, ``from_pretrained(DIR)`` (local
files only). ``cachescope.hf.install()`` instruments transformers' ``Cache``, ``watch(model)``
names the owners, and each generation is ``model.generate(ids, max_new_tokens=N,
do_sample=False)``. The summary, ``--json`` keys (plus ``"backend": "hf"``), exit statuses,
``--serve``, ``--metrics-port`` and the tracing options are the neox run's. ``--fault`` takes
``cachescope.hf``'s faults (injected in every generation; the parser reads the spec with the neox
catalogue, so only ``skip`` passes it today). ``--record FILE`` records the view (``analyze`` and
``report`` read it). Not available: the multi-rank options (a one-line usage error, exit 2).
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import Any

from . import cli
from .cli import UsageError

__all__ = ["run", "hf_model_from_preset"]


def _refuse_options(ns: argparse.Namespace) -> None:
    """One-line usage errors for what the hf backend does not do (yet)."""
    multi = [opt for opt, value in (("--nproc", ns.nproc), ("--tp", ns.tp), ("--pp", ns.pp),
                                    ("--targets-file", ns.targets_file)) if value is not None]
    if multi:
        raise UsageError(f"{multi[0]} is for multi-rank runs of the neox backend; --backend hf "
                         "decodes in one process")
    from . import _multirank
    if _multirank.wanted(ns):   # a rank started by torchrun
        raise UsageError("--backend hf decodes in one process: run it without torchrun")


def hf_model_from_preset(name: str) -> Any:
    """A ``GPTNeoXForCausalLM`` with the shape of the reference preset ``name`` and the reference
    ``NeoXModel``'s seeded random weights (converted with ``cachescope.neox.hf.hf_name_map``)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .neox import NeoXConfig, NeoXModel
    from .neox.hf import hf_name_map

    config = NeoXConfig.preset(name)
    ours = NeoXModel(config).state_dict()
    hf_config = GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size, rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_base, max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps, use_parallel_residual=True, hidden_act="gelu",
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = GPTNeoXForCausalLM(hf_config)
    params = {n for n, _ in model.named_parameters()}
    state = {hf_name: ours[our_name] for hf_name, our_name in hf_name_map(config).items()}
    if "embed_out.weight" not in params:   # transformers 5 names the output head lm_head
        state["lm_head.weight"] = state.pop("embed_out.weight")
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False)
    # only buffers (rotary inv_freq, attention masks) may be missing
    left = sorted(set(missing) & params)
    assert not left and not unexpected, f"weight conversion left {left} / {unexpected}"
    return model.eval()


def _hf_faults(ns: argparse.Namespace, model: Any) -> list[Any]:
    """``--fault`` specs as ``cachescope.hf`` faults, defaults resolved and checked against the
    model (nothing changed); one-line UsageErrors. The parser reads ``--fault`` with the neox
    catalogue, so today only the names both catalogues share (``skip``) reach here."""
    if not ns.fault:
        return []
    try:
        from .hf import inject_faults, parse_hf_fault
    except ImportError:
        raise UsageError("--fault is not available with --backend hf in this build (no "
                         "cachescope.hf.inject_faults)") from None
    faults = []
    for f in ns.fault:
        try:
            faults.append(parse_hf_fault(str(f)))
        except ValueError as exc:
            raise UsageError(f"--fault: {cli._one_line(exc)}") from None
    for f in faults:
        if f.step >= ns.max_new_tokens:
            raise UsageError(f"--fault {f}: step {f.step} never comes: the run has "
                             f"{ns.max_new_tokens} step(s), 0..{ns.max_new_tokens - 1} (step 0 is "
                             "the prompt); raise --max-new-tokens or pick an earlier step")
    try:
        with inject_faults(faults, model) as handle:
            return list(handle.faults)
    except ValueError as exc:
        msg = cli._one_line(exc)
        raise UsageError(f"--{msg}" if msg.startswith("fault ") else f"--fault: {msg}") from None


def _build_model(ns: argparse.Namespace, device: Any) -> tuple[Any, str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        from .hf import MIN_TRANSFORMERS
        raise UsageError("--backend hf needs Hugging Face transformers: pip install "
                         f"'transformers>={MIN_TRANSFORMERS}'") from None
    if not ns.checkpoint:
        return hf_model_from_preset(ns.preset).to(device), f"preset {ns.preset} (hf)"
    if not os.path.isdir(ns.checkpoint):
        raise UsageError(f"--checkpoint: {ns.checkpoint} is not a directory (expected a Hugging "
                         "Face GPT-NeoX checkpoint: config.json + weights)")
    from transformers import GPTNeoXForCausalLM
    try:
        model = GPTNeoXForCausalLM.from_pretrained(ns.checkpoint, local_files_only=True)
    except Exception as exc:   # transformers raises OSError, ValueError, KeyError... for bad dirs
        raise UsageError(f"--checkpoint: {cli._one_line(exc)}") from None
    return model.to(device).eval(), f"checkpoint {ns.checkpoint} (hf)"


def _shape(model: Any) -> Any:
    """What ``cli.run_summary`` reads of a model (the reference model's config names)."""
    c = model.config
    return SimpleNamespace(config=SimpleNamespace(num_layers=c.num_hidden_layers,
                                                  hidden_size=c.hidden_size,
                                                  vocab_size=c.vocab_size),
                           parameters=model.parameters)


def _pad(model: Any) -> dict[str, Any]:
    """``pad_token_id=0`` for generate when the model names none (transformers warns otherwise)."""
    config = getattr(model, "generation_config", None)
    return {} if getattr(config, "pad_token_id", None) is not None else {"pad_token_id": 0}


def run(ns: argparse.Namespace) -> int:
    """``cachescope run --backend hf``; returns the exit status (UsageError: status 2)."""
    _refuse_options(ns)
    device = cli._check_device(ns.device)
    model, model_desc = _build_model(ns, device)
    prompt = cli.prompt_ids(ns, model.config)
    ns.fault = _hf_faults(ns, model)

    import cachescope.hf
    provider = cli.tracer_provider(ns)
    metrics_mod = None
    if ns.metrics_port is not None:
        try:
            from . import metrics as metrics_mod
        except ImportError as exc:
            raise UsageError(f"metrics need prometheus_client ({exc}): pip install cachescope") from None
    if cachescope.hf.installed() is not None:
        raise UsageError("cachescope.hf is already installed in this process")

    import torch
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():   # warm-up, uninstrumented, so tokens/s measures decoding
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                       do_sample=False, **_pad(model))

    name = "hf" if ns.cache_name == "default" else ns.cache_name
    try:
        rec = cachescope.hf.install(name=name, strict=ns.strict, metrics=metrics_mod is not None,
                                    tracing=provider is not None, tracer_provider=provider)
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(f"--cache-name: {exc}") from None
    server = None
    recorder = None
    try:
        cachescope.hf.watch(model, name=name)
        view = rec.view(model)
        if ns.record:   # the view's ops; analyze carries cachescope.hf's own findings through
            recorder = cli.open_recorder(ns, view, {
                "model": model_desc, "backend": "hf", "prompt_tokens": len(prompt),
                "max_new_tokens": ns.max_new_tokens, "faults": [str(f) for f in ns.fault],
                "device": str(device)})
        if metrics_mod is not None:
            server = cli.serve_metrics(ns, metrics_mod)
        return _decode(ns, model, model_desc, rec, view, prompt, ids)
    finally:
        if recorder is not None:
            recorder.close()
        cachescope.hf.uninstall()
        rec.close()
        cli.stop_telemetry(server, provider)


def _decode(ns: argparse.Namespace, model: Any, model_desc: str, rec: Any, view: Any,
            prompt: list[int], ids: Any) -> int:
    import torch
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    loop = cli.GenerationLoop(ns, lambda: len(rec.violations))

    class _Step(StoppingCriteria):
        """Counts tokens, shows progress, ends the generation when --serve is asked to stop."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = loop.on_token(input_ids.shape[-1] - len(prompt) - 1)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                              device=input_ids.device)

    def generate_once() -> list[int]:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=ns.max_new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([_Step()]), **_pad(model))
        return out[0, ids.shape[-1]:].tolist()

    def fault_events(handle: Any) -> list[Any]:
        # the view's steps are the block's forwards in the first generation
        return [SimpleNamespace(fault=e.fault, step=e.step, cache_step=e.step, what=e.what)
                for e in handle.events]

    inject = None
    if ns.fault:
        from .hf import inject_faults
        inject = lambda: inject_faults(ns.fault, model)   # noqa: E731
    loop.run(generate_once, inject, fault_events, (IndexError, KeyError, RuntimeError), "generate")
    lengths = rec.layer_lengths().get(view.name) or {}
    line = rec.layer_summary(view.name)
    return loop.finish(_shape(model), model_desc, view, prompt, list(rec.violations), {
        "backend": "hf", "measured_only": rec.measured_only,
        "layer_kv_tokens": {str(i): n for i, (n, _) in sorted(lengths.items())},
        "notes": [line] if line else []})
