"""Hostile inputs to the command line: recordings nested too deep or cut short, checkpoint configs
with values of the wrong type. Each gives a one-line message (or a note) and the documented exit
status, never a traceback."""

from __future__ import annotations

import gzip
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest

from cachescope.analyze import analyze_file, decode_value, read_record
from cachescope.cli import main

from _helpers import save_tiny_neox_checkpoint

SWAP = "swap@3:layer=1,other=2"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``cachescope ARGV`` in this process; an exception escaping ``main`` fails the test."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def one_line(err: str) -> str:
    """The single line of ``err`` (failing when it has more, or none)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ recordings
@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A faulty run recorded by ``cachescope run --record``: 8 tokens plain, 32 tokens gzipped."""
    root = tmp_path_factory.mktemp("recordings")
    paths = {"plain": root / "swap.jsonl", "big": root / "swap32.jsonl.gz"}
    assert main(["run", "--max-new-tokens", "8", "--fault", SWAP, "--quiet",
                 "--record", str(paths["plain"])]) == 1
    assert main(["run", "--max-new-tokens", "32", "--fault", SWAP, "--quiet",
                 "--record", str(paths["big"])]) == 1
    paths["small"] = root / "swap.jsonl.gz"
    paths["small"].write_bytes(gzip.compress(paths["plain"].read_bytes()))
    return paths


def with_line(src: Path, dst: Path, index: int, line: str, *, replace: bool = False) -> int:
    """Write ``src`` to ``dst`` with ``line`` inserted at (or replacing) 0-based ``index``;
    returns its 1-based line number."""
    lines = src.read_text().splitlines()
    lines[index:index + 1 if replace else index] = [line]
    dst.write_text("\n".join(lines) + "\n")
    return index + 1


def state_line(src: Path, state: str) -> tuple[int, str]:
    """(0-based index, text) of the recording's second ``state_ids`` set, its state replaced."""
    lines = src.read_text().splitlines()
    sets = [i for i, line in enumerate(lines) if '"state":{"tuple":[' in line]
    i = sets[1]
    d = json.loads(lines[i])
    text = json.dumps(dict(d, state="@STATE@"), separators=(",", ":"))
    return i, text.replace('"@STATE@"', state)


def reports(path: Path) -> list[str]:
    return analyze_file(path, out=None).reports()


def test_deeply_nested_array_line_is_skipped_as_unreadable(recordings: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A line of 100,000 nested arrays is skipped like any non-JSON line; the rest is analyzed."""
    path = tmp_path / "deep.jsonl"
    n = with_line(recordings["plain"], path, 5, "[" * 100_000 + "]" * 100_000)
    rc, out, _ = cli(capsys, "analyze", str(path))
    assert rc == 1
    assert f"note: line {n} is not a JSON object" in out
    assert reports(path) == reports(recordings["plain"])


@pytest.mark.parametrize("state", [
    '{"tuple":[' * 5000 + "0" + "]}" * 5000,      # past what the JSON parser can nest
    "[" * 600 + "0" + "]" * 600,                    # valid JSON, deeper than decode_value recursed
    '{"a":' * 600 + "0" + "}" * 600,
], ids=["tuple-5000", "list-600", "object-600"])
def test_deeply_nested_state_value_is_skipped_as_unreadable(
        recordings: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str) -> None:
    """A state_ids set whose value nests hundreds of levels deep is an unreadable line: noted, skipped, the analysis goes on."""
    path = tmp_path / "deep-state.jsonl"
    i, line = state_line(recordings["plain"], state)
    n = with_line(recordings["plain"], path, i, line, replace=True)
    rc, out, _ = cli(capsys, "analyze", "--quiet", str(path))
    assert rc in (0, 1)
    assert f"note: line {n} is not a JSON object" in out


def test_decode_value_refuses_deep_nesting_with_a_value_error() -> None:
    """decode_value raises ValueError, not RecursionError, for values nested past 100 levels, and still decodes shallow ones."""
    assert decode_value({"tuple": [1, {"tuple": [2, [3]]}]}) == (1, (2, [3]))
    deep: Any = 0
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nests more than 100"):
        decode_value(deep)
    with pytest.raises(ValueError, match="nests more than 100"):
        decode_value(json.loads('{"tuple":[' * 400 + "0" + "]}" * 400))
    with pytest.raises(ValueError, match="nests more than 100"):
        decode_value({"repr": deep, "type": "X"})


def test_deeply_nested_header_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A first line of 100,000 nested arrays is an unreadable file: exit 2 and a one-line message."""
    path = tmp_path / "deep-header.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    rc, _, err = cli(capsys, "analyze", str(path))
    assert rc == 2
    assert "not a cachescope record" in one_line(err) and "nested too deep" in err


def test_report_skips_a_deeply_nested_line(recordings: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`cachescope report` draws a recording holding a 100,000-deep line, noting the line in index.html."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "deep.jsonl"
    n = with_line(recordings["plain"], path, 5, "[" * 100_000 + "]" * 100_000)
    rc, _, _ = cli(capsys, "report", str(path), "--out", str(tmp_path / "report"), "--quiet")
    assert rc == 0
    assert f"line {n} is not a JSON object" in (tmp_path / "report" / "index.html").read_text()


# ------------------------------------------------------------------------------ gzip cut short
def complete_lines(prefix: bytes) -> int:
    """How many newline-terminated lines the readable part of a cut gzip stream holds."""
    return zlib.decompressobj(wbits=31).decompress(prefix).count(b"\n")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_gzip_cut_in_its_first_64k_keeps_every_complete_line(
        recordings: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: float) -> None:
    """A small gzip recording cut short is analyzed up to its last complete line, with one note saying where the file ends."""
    data = recordings["small"].read_bytes()
    cut = data[:int(len(data) * keep)]
    lines = complete_lines(cut)
    assert lines > 1
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    plain = tmp_path / "prefix.jsonl"    # the same complete lines, uncut
    plain.write_bytes(b"".join(recordings["plain"].read_bytes().splitlines(keepends=True)[:lines]))

    rc, out, _ = cli(capsys, "analyze", "--quiet", str(path))
    expected_rc, _, _ = cli(capsys, "analyze", "--quiet", str(plain))
    assert rc == expected_rc
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, out
    assert notes[0].startswith(f"note: the file ends early after line {lines} (EOFError: Compressed "
                               "file ended before the end-of-stream marker was reached")
    assert notes[0].endswith("analyzed what was there")
    result = analyze_file(path, out=None)
    assert result.lines == lines and result.reports() == reports(plain)


def test_gzip_cut_past_64k_loses_no_complete_line(recordings: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A gzip recording larger than the read buffer, cut in the middle, is analyzed up to its last complete line."""
    data = recordings["big"].read_bytes()
    assert len(gzip.decompress(data)) > 1 << 17
    cut = data[:len(data) // 2]
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    rc, out, _ = cli(capsys, "analyze", "--quiet", str(path))
    assert rc == 1
    assert f"note: the file ends early after line {complete_lines(cut)} (EOFError" in out


def test_gzip_cut_inside_the_header_is_a_one_line_error(recordings: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A gzip recording cut before its first line ends is unreadable: exit 2 and a one-line message."""
    data = recordings["small"].read_bytes()
    cut = next(data[:k] for k in range(10, len(data)) if zlib.decompressobj(wbits=31).decompress(data[:k]))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    rc, _, err = cli(capsys, "analyze", str(path))
    assert rc == 2
    assert "ends inside its first line" in one_line(err)


def test_corrupt_gzip_keeps_the_lines_before_the_damage(recordings: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Damaged compressed data ends the analysis with a one-line note; the lines read before it are analyzed."""
    data = bytearray(recordings["big"].read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])    # a wrong CRC and length in the trailer
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    rc, out, _ = cli(capsys, "analyze", "--quiet", str(path))
    assert rc == 1
    assert "(BadGzipFile: corrupt gzip data" in out


def test_gzip_reader_handles_members_and_long_lines(tmp_path: Path) -> None:
    """Concatenated gzip members read as one file, and a line inflating past 1 MiB comes back whole."""
    path = tmp_path / "two.jsonl.gz"
    header = json.dumps({"type": "header", "format": "cachescope-record", "version": 1})
    long = json.dumps({"type": "note", "text": "x" * 3_000_000})
    path.write_bytes(gzip.compress(f"{header}\n{long}\n".encode()) + b"\0\0"
                     + gzip.compress(b'{"type": "note"}\n{"type": "end"}'))
    _, lines = read_record(path)
    got = list(lines)
    assert [n for n, _ in got] == [2, 3, 4]
    assert len(got[0][1]["text"]) == 3_000_000 and got[2][1] == {"type": "end"}


# ------------------------------------------------------------------------------ checkpoint configs
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GPT-NeoX checkpoint saved by transformers (config.json + model.safetensors)."""
    return save_tiny_neox_checkpoint(tmp_path_factory.mktemp("ckpt") / "neox")


def edited(checkpoint: Path, dst: Path, changes: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """A copy of ``checkpoint`` whose config.json has ``changes`` applied (``drop``: keys removed)."""
    shutil.copytree(checkpoint, dst)
    config = json.loads((dst / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


BAD_CONFIGS = [
    ({"hidden_size": "abc"}, "hidden_size", '"abc" (a string)', "a positive integer"),
    ({"hidden_size": None}, "hidden_size", "null", "a positive integer"),
    ({"hidden_size": 64.7}, "hidden_size", "64.7 (a number)", "a positive integer"),
    ({"hidden_size": True}, "hidden_size", "true (a boolean)", "a positive integer"),
    ({"vocab_size": -5}, "vocab_size", "-5 (an integer)", "a positive integer"),
    ({"num_attention_heads": [4]}, "num_attention_heads", "[4] (an array)", "a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers", "0 (an integer)", "a positive integer"),
    ({"head_dim": "x"}, "head_dim", '"x" (a string)', "a positive integer"),
    ({"intermediate_size": 96.5}, "intermediate_size", "96.5 (a number)", "a positive integer"),
    ({"max_position_embeddings": "64"}, "max_position_embeddings", '"64" (a string)', "a positive integer"),
    ({"rope_parameters": [{"rope_type": "default"}]}, "rope_parameters", '[{"rope_type": "default"}] (an array)',
     "an object"),
    ({"rope_scaling": "linear"}, "rope_scaling", '"linear" (a string)', "an object"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": "x"}},
     "rope_parameters.partial_rotary_factor", '"x" (a string)', "a number in [0, 1]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, "rope_parameters.rope_theta",
     "-1 (an integer)", "a positive number"),
    ({"rotary_pct": 1.5}, "rotary_pct", "1.5 (a number)", "a number in [0, 1]"),
    ({"rotary_emb_base": [10000]}, "rotary_emb_base", "[10000] (an array)", "a positive number"),
    ({"rope_theta": "10000"}, "rope_theta", '"10000" (a string)', "a positive number"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps", '"1e-5" (a string)', "a positive number"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps", "NaN (a number)", "a positive number"),
    ({"layer_norm_eps": 0}, "layer_norm_eps", "0 (an integer)", "a positive number"),
    ({"use_parallel_residual": "false"}, "use_parallel_residual", '"false" (a string)', "true or false"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", '"yes" (a string)', "true or false"),
    ({"attention_bias": 1}, "attention_bias", "1 (an integer)", "true or false"),
]


@pytest.mark.parametrize(("changes", "field", "shown", "expected"), BAD_CONFIGS,
                         ids=[f"{c[1]}={c[2].split(' (')[0]}" for c in BAD_CONFIGS])
def test_config_value_of_the_wrong_type_is_a_one_line_error(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        changes: dict[str, Any], field: str, shown: str, expected: str) -> None:
    """`run --checkpoint` with a config.json field of the wrong type or range exits 2 with one line naming the field, the value and what is expected."""
    path = edited(checkpoint, tmp_path / "ckpt", changes,
                  drop=("rope_parameters",) if "rotary_pct" in changes or "rotary_emb_base" in changes
                  or "rope_theta" in changes else ())
    rc, out, err = cli(capsys, "run", "--checkpoint", str(path), "--max-new-tokens", "2")
    assert rc == 2 and not out
    line = one_line(err)
    assert line.startswith("cachescope run: error: --checkpoint: ")
    assert f"{field} must be {expected}" in line and f"found {shown}" in line, line


def test_config_layer_count_beyond_the_weights_is_one_line(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """num_hidden_layers far beyond the layers in the weights is refused at once with one line naming both counts."""
    path = edited(checkpoint, tmp_path / "ckpt", {"num_hidden_layers": 100_000})
    rc, _, err = cli(capsys, "run", "--checkpoint", str(path), "--max-new-tokens", "2")
    assert rc == 2
    assert "num_hidden_layers is 100000 but the weights hold layers 0..2 only" in one_line(err)


def test_config_too_large_to_build_is_one_line(checkpoint: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A config.json whose sizes overflow what torch can describe is one line, exit 2."""
    path = edited(checkpoint, tmp_path / "ckpt", {"hidden_size": 2**40, "intermediate_size": 2**40})
    rc, _, err = cli(capsys, "run", "--checkpoint", str(path), "--max-new-tokens", "2")
    assert rc == 2
    assert "cannot be built" in one_line(err)


def test_config_integral_floats_are_read_as_integers(checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes written as integral JSON numbers (32.0) load as the integers they spell; nulls of optional fields mean "not set"."""
    path = edited(checkpoint, tmp_path / "ckpt", {
        "hidden_size": 32.0, "num_attention_heads": 4.0, "intermediate_size": 64.0, "head_dim": None,
        "rope_scaling": None, "layer_norm_eps": 1e-5, "tie_word_embeddings": None})
    rc, out, err = cli(capsys, "run", "--checkpoint", str(path), "--max-new-tokens", "2")
    assert rc == 0, err
    assert "(3 layers, hidden 32, vocab 128)" in out


def test_config_json_nested_too_deep_is_one_line(checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A config.json nesting 100,000 arrays is one line, exit 2."""
    path = edited(checkpoint, tmp_path / "ckpt", {})
    (path / "config.json").write_text('{"model_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    rc, _, err = cli(capsys, "run", "--checkpoint", str(path), "--max-new-tokens", "2")
    assert rc == 2
    assert "too deep to parse" in one_line(err)
