"""Prometheus file-based service discovery (``file_sd_configs``) for multi-rank runs.

The launcher of ``cachescope run --nproc N --serve`` writes one target group per rank, each
labelled with the rank's ``rank``/``tp_rank``/``pp_rank`` and ``job``, to a JSON file that
``dashboards/prometheus/prometheus.yml`` reads (``targets/*.json`` beside it; see
docs/dashboards.md). The file is replaced atomically (a temporary file in the same directory,
then ``os.replace``), so Prometheus never reads half of it; the temporary name does not end in
``.json``, so a ``*.json`` glob never picks it up. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["DEFAULT_JOB", "write_targets", "remove_targets"]

#: The ``job`` label of every target unless its labels say otherwise: the same job as a
#: single-process run, so the dashboard's ``$job`` and the rules (``CachescopeTargetDown``) cover
#: every rank.
DEFAULT_JOB = "cachescope"

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _address(host: str, port: int, i: int) -> str:
    if not isinstance(host, str) or not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"targets[{i}]: host must be a non-empty host name or address without "
                         f"spaces or '/', got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"targets[{i}]: port must be an int in 1..65535, got {port!r}")
    if ":" in host and not host.startswith("["):   # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


def _labels(labels: Mapping[str, Any], job: str, i: int) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels_per_target[{i}] must be a dict of label name -> value, got "
                         f"{type(labels).__name__}")
    out = {"job": job}
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name):
            raise ValueError(f"labels_per_target[{i}]: invalid Prometheus label name {name!r} "
                             "(names match [a-zA-Z_][a-zA-Z0-9_]*)")
        out[name] = str(value)
    return out


def write_targets(path: str | os.PathLike[str], targets: Sequence[tuple[str, int]],
                  labels_per_target: Sequence[Mapping[str, Any]] | None = None, *,
                  job: str = DEFAULT_JOB) -> Path:
    """Write ``targets`` (``(host, port)`` per rank) as a Prometheus file_sd JSON file at
    ``path``, atomically; returns the path.

    One target group per target, labelled with its ``labels_per_target`` entry (e.g.
    ``cachescope.metrics.rank_labels(rank, tp_rank, pp_rank)``; values become strings) and
    ``job`` (default ``cachescope``; a ``job`` key in the labels wins). Missing parent
    directories are created. Bad arguments raise ``ValueError`` naming the entry; a failed write
    raises ``OSError`` and leaves any previous file as it was.
    """
    targets = list(targets)
    if labels_per_target is None:
        labels_per_target = [{} for _ in targets]
    labels_per_target = list(labels_per_target)
    if len(labels_per_target) != len(targets):
        raise ValueError(f"labels_per_target has {len(labels_per_target)} entries for "
                         f"{len(targets)} targets: give one label dict per target")
    if not isinstance(job, str) or not job:
        raise ValueError(f"job must be a non-empty string, got {job!r}")
    groups = []
    seen: dict[str, int] = {}
    for i, (target, labels) in enumerate(zip(targets, labels_per_target)):
        try:
            host, port = target
        except (TypeError, ValueError):
            raise ValueError(f"targets[{i}] must be a (host, port) pair, got {target!r}") from None
        address = _address(host, port, i)
        if address in seen:
            raise ValueError(f"targets[{i}] and targets[{seen[address]}] are both {address}: "
                             "each rank needs its own metrics port")
        seen[address] = i
        groups.append({"targets": [address], "labels": _labels(labels, job, i)})
    text = json.dumps(groups, indent=2, sort_keys=True) + "\n"

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes it 0600; Prometheus may run as another user
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def remove_targets(path: str | os.PathLike[str]) -> bool:
    """Remove a targets file written by ``write_targets`` (when the run ends, so that Prometheus
    stops scraping its ranks). Returns False when it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
