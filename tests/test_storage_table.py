"""The C storage table of ``FamilyCounters`` against its pure-Python counterpart.

``FamilyStats.hold/release`` count each storage once however many queued items share it. With the
extension built this is an open-addressing table in C (``_speedups.FamilyCounters``), without it
a dict (``_accounting._PyCounters``). Random hold/release/drop_all sequences, with keys chosen to
collide in the table and to make it grow and shrink, must leave both in the same state.
"""

from __future__ import annotations

import random

import pytest

from cachescope import _hot
from cachescope._accounting import _COUNTERS, _PyCounters

pytestmark = pytest.mark.skipif(not _hot.AVAILABLE, reason="cachescope._speedups is not built")


def _fresh(cls: type) -> object:
    c = cls()
    for name in _COUNTERS:
        setattr(c, name, 0)
    return c


def _state(c: object) -> tuple:
    return tuple(getattr(c, n) for n in _COUNTERS), c.held_storages()


@pytest.mark.parametrize("seed", range(12))
def test_c_table_matches_python(seed: int) -> None:
    from cachescope._speedups import FamilyCounters
    rng = random.Random(seed)
    c, py = _fresh(FamilyCounters), _fresh(_PyCounters)
    # keys that share low bits (storage pointers are aligned) and a few that collide outright
    base = rng.randrange(1 << 40, 1 << 47) & ~0xFFF
    pool = [base + 16 * rng.randrange(0, 4096) for _ in range(rng.choice((3, 40, 700)))]
    pool += [base + (1 << 20) * k for k in range(8)]
    live: list[tuple[int, tuple[tuple[int, int], ...]]] = []
    nbytes: dict[int, int] = {}
    for step in range(3000):
        r = rng.random()
        if r < 0.5 or not live:
            keys = rng.sample(pool, rng.choice((0, 1, 1, 2, 3)))
            storages = tuple((k, nbytes.setdefault(k, rng.randrange(1, 1 << 20))) for k in keys)
            logical = rng.randrange(0, 1 << 16)
            for x in (c, py):
                x.hold(logical, storages)
            live.append((logical, storages))
        elif r < 0.97:
            logical, storages = live.pop(rng.randrange(len(live)) if rng.random() < 0.3 else 0)
            if rng.random() < 0.05:   # a key no item holds: ignored by both
                storages = storages + ((base - 16, 1),)
            for x in (c, py):
                x.release(logical, storages)
        else:
            for x in (c, py):
                x.drop_all()
            live.clear()
        if step % 97 == 0 or not live:
            assert _state(c) == _state(py), step
    assert _state(c) == _state(py)
    while live:
        logical, storages = live.pop()
        for x in (c, py):
            x.release(logical, storages)
    assert _state(c) == _state(py)
    assert c.held_storages() == [] and c.storage == 0


def test_table_rejects_bad_storages() -> None:
    from cachescope._speedups import FamilyCounters
    c = _fresh(FamilyCounters)
    with pytest.raises(TypeError):
        c.hold(1, [("not an int", 4)])
    with pytest.raises(TypeError):
        c.hold(1, [(1, 2, 3)])
    with pytest.raises(TypeError):
        c.release(1, 5)
