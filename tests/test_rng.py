"""The host probe generator (rng.py): its construction, its statistics, and device-side keys."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from ofa_kernels import rng

DISTS = ["rademacher", "gaussian"]


def test_probes_are_balanced_and_uncorrelated():
    n = 400_000
    a = rng.probes((n,), 11, "rademacher")
    b = rng.probes((n,), 11, "rademacher", probe=1)
    c = rng.probes((n,), 11, "rademacher", layer=1)
    z = rng.probes((n,), 11, "gaussian")
    bound = 5 / n**0.5
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    for stat in (a.mean(), (a * b).mean(), (a * c).mean(), (a[1:] * a[:-1]).mean(), z.mean()):
        assert abs(stat) < bound
    assert abs(z.var() - 1) < 0.02 and abs((z**4).mean() - 3) < 0.1


def test_a_seed_tensor_gives_the_host_keys_without_reading_back(monkeypatch):
    """Keys derived on the device from a 0-dim seed tensor equal the host's, for seeds past 2**32 too;
    nothing is read back to the host (a captured CUDA graph can advance the seed in place)."""
    seeds = [0, 1, 42 * 7919 + 299, 2**31 - 1, 2**32 + 5, int(torch.randint(0, 2**62, ()))]
    for name in ("item", "tolist", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail(f"Tensor read back ({name})"))
    got = [rng.key_table(torch.tensor(s, device=DEVICE), layer, first, 3, DEVICE)
           for s in seeds for layer, first in ((0, 0), (7, 2), (29, 5))]
    monkeypatch.undo()
    want = [rng.key_table(s, layer, first, 3, DEVICE) for s in seeds for layer, first in ((0, 0), (7, 2), (29, 5))]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="0-dim"):
        rng.key_table(torch.tensor([1, 2]), 0, 0, 1, "cpu")


def _lowbias32(x: int) -> int:
    """C. Wellons' lowbias32, written from its definition in plain Python integers (independent of rng.py)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("dist", DISTS)
def test_the_host_generator_equals_a_plain_python_one(dist):
    """The host generator is what every backend is compared with: here it is held to a scalar
    Python transcription of the documented construction (so the torch backend's test, which runs
    that very generator, is not a comparison of a function with itself)."""
    import math

    seed, layer, probe = int(torch.randint(0, 2**62, ())), 3, 5
    k0, k1 = rng.probe_keys(seed, layer, probe)
    counters = list(range(200)) + [2**31 - 7, 2**30 + 12345]
    got = rng.values(torch.tensor(counters), k0, k1, dist, torch.float64)

    def bits(c: int) -> int:
        return _lowbias32(((_lowbias32(c ^ k0)) + k1) & 0xFFFFFFFF)

    if dist == "rademacher":
        want = [1.0 - 2.0 * (bits(c) >> 31) for c in counters]
        assert got.tolist() == want
    else:
        want = [math.sqrt(-2.0 * math.log(((bits(2 * c) >> 8) + 1) * 2.0**-24))
                * math.cos(2.0 * math.pi * ((bits(2 * c + 1) >> 8) * 2.0**-24)) for c in counters]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=2e-6)  # fp32 math
    assert len(set(got.tolist())) > 2 or dist == "rademacher"
