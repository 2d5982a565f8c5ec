"""``cachescope run --backend hf``: transformers' own generate() checked by cachescope.hf."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import cachescope.hf  # noqa: E402
from cachescope import _hfrun  # noqa: E402
from cachescope.cli import main  # noqa: E402
from _hf_models import dup_layer_idx, neox  # noqa: E402
from _helpers import serve_scrape_and_stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HF = ["run", "--backend", "hf", "--max-new-tokens", "4"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert cachescope.hf.installed() is None
    return rc, out, err


def plain_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Tokens of an uninstrumented transformers greedy generate."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[-1]:].tolist()


def test_clean_run_exits_0_with_the_uninstrumented_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """A preset run is clean (exit 0) and yields the tokens of plain transformers generate on the same model."""
    rc, out, err = run(capsys, *HF, "--json", "--prompt-ids", "1,2,3,4,5")
    assert rc == 0, err
    s = json.loads(out)
    assert s["violations"] == [] and s["exit_code"] == 0 and s["error"] is None
    assert s["output_tokens"] == plain_greedy(_hfrun.hf_model_from_preset("tiny"), [1, 2, 3, 4, 5], 4)


def test_preset_weights_match_the_neox_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """A preset is the reference model's seeded weights: both backends generate the same tokens."""
    rc, out, _ = run(capsys, *HF, "--json")
    rc2, out2, _ = run(capsys, "run", "--max-new-tokens", "4", "--json")
    assert rc == rc2 == 0
    assert json.loads(out)["output_tokens"] == json.loads(out2)["output_tokens"]


def test_json_has_the_neox_keys_and_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints the neox run's keys plus ``backend: hf``; steps, ops and families are the hf view's."""
    rc, out, _ = run(capsys, *HF, "--json")
    rc2, out2, _ = run(capsys, "run", "--max-new-tokens", "4", "--json")
    s, ref = json.loads(out), json.loads(out2)
    assert rc == rc2 == 0
    assert set(ref) <= set(s) and s["backend"] == "hf"
    assert s["cache"] == "hf" and s["layers"] == 4 and s["tokens"] == 4 and s["steps"] == 4
    assert set(s["families"]) == {"layer"} and s["ops"]["push"] == 16 and s["ops"]["pop"] == 12


def test_human_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """The human summary names the model, tokens/s, the view's report and the result."""
    rc, out, _ = run(capsys, *HF)
    assert rc == 0
    assert "preset tiny (hf)" in out and "tokens/s" in out and "summary for cache 'hf'" in out
    # the tiny preset: 4 layers; the last forward's cache holds the prompt (8) and 3 new tokens
    assert "KV tokens per layer after the last forward: 4 full-attention layer(s) x 11 (skew 0)" in out
    assert out.rstrip().endswith("result: no violations")


@pytest.fixture
def copied_layer_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every preset becomes a 3-layer GPT-NeoX whose layer 1 keeps layer 0's layer_idx."""
    def buggy(_name: str) -> Any:
        model = neox(3)
        dup_layer_idx(model, 0, 1)
        return model
    monkeypatch.setattr(_hfrun, "hf_model_from_preset", buggy)


def test_planted_bug_exits_1_with_its_report(capsys: pytest.CaptureFixture[str],
                                             copied_layer_preset: None) -> None:
    """A model with a copied layer_idx exits 1 with owner_mismatch reported (kind, queue, report)."""
    rc, out, _ = run(capsys, *HF, "--json", "--prompt-ids", "5,6,7")
    s = json.loads(out)
    assert rc == 1 and s["exit_code"] == 1
    assert s["violations"][0]["kind"] == "owner_mismatch" and s["violations"][0]["queue"] == "layer_0"
    assert "gpt_neox.layers.1.attention" in s["violations"][0]["report"]
    assert {"owner_mismatch", "layer_repeated", "layer_skipped"} <= set(s["violations_by_kind"])
    # layer 0 holds both modules' tokens: two 3-token rows per forward; layer 1 nothing
    assert s["layer_kv_tokens"] == {"0": 2 * (3 + 3), "1": 0, "2": 3 + 3}


def test_fault_fires_and_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """``--fault skip@2:layer=1`` (cachescope.hf's fault) fires at step 2: layer_skipped on layer_1, exit 1."""
    rc, out, _ = run(capsys, *HF, "--json", "--fault", "skip@2:layer=1")
    s = json.loads(out)
    assert rc == 1 and s["exit_code"] == 1
    assert s["faults"] == [{"spec": "skip@2:layer=1", "expected_kinds": ["layer_skipped"]}]
    assert [(e["fault"], e["step"]) for e in s["fault_events"]] == [("skip@2:layer=1", 2)]
    assert s["faults_not_fired"] == []
    assert [(v["kind"], v["step"], v["queue"]) for v in s["violations"]] == [("layer_skipped", 2, "layer_1")]


def test_fault_leaves_the_model_clean_after_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The human summary says when the fault fired; a run without it on the same process is clean."""
    rc, out, _ = run(capsys, *HF, "--fault", "skip@2:layer=1")
    assert rc == 1 and "fault skip@2:layer=1 fired at step 2" in out
    assert "result: 1 violation(s) (layer_skipped=1)" in out
    rc, out, _ = run(capsys, *HF)
    assert rc == 0 and "result: no violations" in out


def test_strict_stops_at_the_first_violation(capsys: pytest.CaptureFixture[str],
                                             copied_layer_preset: None) -> None:
    """``--strict`` ends the generate at the first violation, reports it and exits 1."""
    rc, out, _ = run(capsys, *HF, "--strict", "--cache-name", "demo")
    assert rc == 1
    assert "stopped at the first violation (--strict)" in out and "owner_mismatch" in out
    assert "summary for cache 'demo'" in out


def test_help_names_the_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """``run --help`` lists ``--backend`` with both choices."""
    rc, out, _ = run(capsys, "run", "--help")
    assert rc == 0 and "--backend {neox,hf}" in out


@pytest.mark.parametrize("args, words", [
    (["--nproc", "2"], "--nproc is for multi-rank"),
    (["--tp", "2"], "--tp is for multi-rank"),
    (["--pp", "2"], "--pp is for multi-rank"),
    (["--fault", "swap@1"], "unknown HF fault 'swap'"),
    (["--fault", "skip@9"], "step 9 never comes"),
    (["--fault", "skip@2:layer=7"], "--fault skip@2:layer=7"),
    (["--record", "/nonexistent/dir/x.jsonl"], "--record: cannot write"),
    (["--checkpoint", "/nonexistent"], "is not a directory"),
    (["--device", "tpu"], "--device"),
    (["--prompt-ids", "9999"], "out of range"),
    (["--backend", "jax"], "invalid choice"),
])
def test_bad_combinations_exit_2_in_one_line(capsys: pytest.CaptureFixture[str], args: list[str],
                                             words: str, tmp_path: Path) -> None:
    """Options the hf backend does not support, and bad values, are one-line errors with exit 2."""
    args = [str(tmp_path / a) if a == "x.jsonl" else a for a in args]
    rc, out, err = run(capsys, *HF, *args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("fault", [None, "dup-layer-idx", "skip@2", "prune", "partial-crop@2"])
def test_record_replays_to_the_live_violations(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               fault: str | None) -> None:
    """``--record`` writes the view; ``analyze`` replays it to the live run's violations (kind,
    step, layer, both owners, hint; cachescope.hf's own findings carried through) and summary
    counts; ``report`` draws it."""
    from cachescope.analyze import analyze_file
    path = tmp_path / "hf.jsonl.gz"
    rc, out, err = run(capsys, *HF, "--max-new-tokens", "5", "--json", "--record", str(path),
                       *(["--fault", fault] if fault else []))
    live = json.loads(out)
    assert rc == (1 if fault else 0), err
    result = analyze_file(path, out=None)
    fields = ("kind", "step", "queue", "consumer", "producer", "hint")
    assert [tuple(getattr(v, f) for f in fields) for v in result.violations] == [
        tuple(v[f] for f in fields) for v in live["violations"]]
    assert result.header["run"]["backend"] == "hf"
    layer = result.cache.stats.family("layer")
    assert (result.cache.stats.steps, layer.push, layer.pop, result.ops) == (
        live["steps"], live["ops"]["push"], live["ops"]["pop"], live["total_ops"])
    rc = main(["report", str(path), "--out", str(tmp_path / "pics"), "--quiet"])
    assert rc == 0 and any((tmp_path / "pics").iterdir())


def test_checkpoint_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--checkpoint DIR`` loads a saved GPTNeoXForCausalLM and decodes it like transformers does."""
    model = neox(2)
    model.save_pretrained(tmp_path)
    rc, out, err = run(capsys, *HF, "--checkpoint", str(tmp_path), "--json", "--prompt-ids", "5,6,7")
    assert rc == 0, err
    s = json.loads(out)
    assert s["model"] == f"checkpoint {tmp_path} (hf)" and s["layers"] == 2 and s["vocab_size"] == 128
    assert s["violations"] == [] and s["output_tokens"] == plain_greedy(model, [5, 6, 7], 4)


def test_bad_checkpoint_dir_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A directory without a checkpoint is a one-line ``--checkpoint`` error, exit 2."""
    rc, out, err = run(capsys, *HF, "--checkpoint", str(tmp_path))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--checkpoint" in err


def test_serve_exposes_metrics_and_stops_on_sigterm() -> None:
    """``--backend hf --serve --metrics-port 0`` serves the hf view's metrics and exits 0 on SIGTERM."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    rc, out, err, _ = serve_scrape_and_stop([*HF, "--serve", "--metrics-port", "0"], ROOT, env,
                                            r'cachescope_ops_total\{[^}]*cache="hf"[^}]*\} [1-9]')
    assert rc == 0, err
    assert "generation(s)" in out and "result: no violations" in out
    assert "Traceback" not in err


def test_every_hf_fault_name_reaches_the_hf_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """`--fault prune:layer=1` parses (the HF catalogue) and fires on --backend hf."""
    code, out, err = run(capsys, "run", "--backend", "hf", "--max-new-tokens", "4", "--json",
                         "--fault", "prune:layer=1")
    assert code == 1, err
    s = json.loads(out)
    assert [(v["kind"], v["step"], v["queue"]) for v in s["violations"]] == [
        ("layer_skipped", 0, "layer_1")]


def test_hf_faults_are_refused_by_the_reference_backend(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "run", "--fault", "dup-layer-idx")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "cachescope run: error: --fault dup-layer-idx@0: a fault of transformers' cache "
        "(cachescope.hf), not of the reference model; run it with --backend hf"]
    code, _, err = run(capsys, "run", "--fault", "bogus")
    assert code == 2 and "with --backend hf: prune, dup-layer-idx, skip, partial-crop" in err
