"""Counter-based random probes: the same numbers in Triton kernels and on the host.

A probe element is a pure function of ``(seed, layer, probe, counter)``, so kernels regenerate a
probe wherever it is needed (perturbation, dot products, their backward) instead of storing a
B x T x d tensor per layer, and :func:`probes` reproduces it anywhere for tests.

The generator: each ``(seed, layer, probe)`` gives two 32-bit keys ``(k0, k1)`` (mixed on the host
in Python integers); an element's 32 random bits are ``mix(mix(counter ^ k0) + k1)`` with ``mix``
the "lowbias32" integer hash (C. Wellons). Keys differ per probe in both places, so two probes are
not index permutations of each other. Statistically sound for Hutchinson probes, not cryptographic.

- Rademacher: the top bit gives the sign (+1 / -1), exactly equal on every backend.
- Gaussian: Box-Muller from the bits of counters ``2c`` and ``2c + 1``; equal across backends up to
  the last ulps of ``log``/``cos`` (different math libraries).

The counter of element ``j`` of row ``r`` of a ``[rows, d]`` slab is ``r * d + j``; a slab holds at
most 2**31 elements per probe.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .vocab import DISTRIBUTIONS, check_choice

MAX_COUNTER = 2**31
_MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B


def mix32(x: int) -> int:
    """lowbias32 on a Python int (host-side key derivation)."""
    x &= _MASK
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    x ^= x >> 16
    return x


def probe_keys(seed: int, layer: int, probe: int) -> tuple[int, int]:
    """The two 32-bit keys of one probe vector."""
    h = mix32(seed ^ mix32(seed >> 32))
    h = mix32(h + 0x9E3779B9 * (layer + 1))
    h = mix32(h ^ mix32(0x85EBCA6B * (probe + 1)))
    return h, mix32(h ^ 0x5BD1E995)


class ProbeStream(NamedTuple):
    """Which probes a perturbation draws: probes ``first .. first + count - 1`` of block ``layer`` under
    ``seed`` (an int, or a 0-dim int64 tensor read on the device: see ``key_table``)."""

    seed: int | torch.Tensor
    layer: int
    first: int = 0
    count: int = 1

    def keys(self, device) -> torch.Tensor:
        """The stream's ``key_table`` on ``device``."""
        return key_table(self.seed, self.layer, self.first, self.count, device)


def key_table(seed: int | torch.Tensor, layer: int, first_probe: int, num_probes: int, device) -> torch.Tensor:
    """[num_probes, 2] int64 keys for consecutive probes, as the kernels read them.

    ``seed`` may be a 0-dim int64 tensor (on ``device``): the keys are then derived there by tensor
    ops, with nothing read back to the host, so a captured CUDA graph that advances the seed tensor
    in place draws new probes on every replay. Both give the same keys for the same seed.
    """
    if isinstance(seed, torch.Tensor):
        return _key_table_on_device(seed.to(device=device, dtype=torch.int64), layer, first_probe, num_probes)
    keys = [probe_keys(seed, layer, first_probe + k) for k in range(num_probes)]
    return torch.tensor(keys, dtype=torch.int64, device=device).reshape(num_probes, 2)


def _key_table_on_device(seed: torch.Tensor, layer: int, first_probe: int, num_probes: int) -> torch.Tensor:
    """``probe_keys`` as int64 tensor ops (values kept in [0, 2**32) as ``mix32`` masks them)."""
    if seed.dim() != 0:
        raise ValueError(f"a seed tensor must be a 0-dim integer tensor, got shape {tuple(seed.shape)}")
    h = _mix32_t((seed ^ _mix32_t((seed >> 32) & _MASK)) & _MASK)
    h = _mix32_t((h + 0x9E3779B9 * (layer + 1)) & _MASK)
    probe = torch.arange(first_probe + 1, first_probe + num_probes + 1, dtype=torch.int64, device=seed.device)
    k0 = _mix32_t((h ^ _mix32_t((0x85EBCA6B * probe) & _MASK)) & _MASK)
    return torch.stack([k0, _mix32_t((k0 ^ 0x5BD1E995) & _MASK)], 1)


def check_distribution(distribution: str) -> str:
    return check_choice("distribution", distribution, DISTRIBUTIONS)


# ------------------------------------------------------------------ host implementation (torch int64)


def _mul32(a: torch.Tensor, m: int) -> torch.Tensor:
    """(a * m) mod 2**32 for 0 <= a < 2**32 without int64 overflow (16-bit halves)."""
    lo = a * (m & 0xFFFF)
    hi = ((a * (m >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def random_bits(counters: torch.Tensor, k0: torch.Tensor | int, k1: torch.Tensor | int) -> torch.Tensor:
    """32 random bits (as int64 in [0, 2**32)) per counter; keys broadcast against counters."""
    return _mix32_t((_mix32_t(counters ^ k0) + k1) & _MASK)


def values(counters: torch.Tensor, k0, k1, distribution: str, dtype=torch.float32) -> torch.Tensor:
    """Probe values for int64 ``counters`` under keys ``(k0, k1)`` (ints or broadcastable tensors)."""
    if distribution == "rademacher":
        sign_bit = random_bits(counters, k0, k1) >> 31
        return (1 - 2 * sign_bit).to(dtype)
    check_distribution(distribution)
    bits_a = random_bits(2 * counters, k0, k1)
    bits_b = random_bits(2 * counters + 1, k0, k1)
    u1 = ((bits_a >> 8) + 1).to(torch.float32) * 2.0**-24  # (0, 1]
    u2 = (bits_b >> 8).to(torch.float32) * 2.0**-24  # [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype)


def probes(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    distribution: str = "rademacher",
    *,
    layer: int = 0,
    probe: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The probe vector ``nu`` for ``(seed, layer, probe)`` over a tensor of ``shape``, on the host.

    The kernels draw the same numbers: element ``i`` of the flattened shape has counter ``i``.
    """
    check_distribution(distribution)
    numel = math.prod(shape)
    if numel > MAX_COUNTER:
        raise ValueError(f"shape {tuple(shape)} has {numel} elements; probes support at most 2**31 per probe")
    k0, k1 = probe_keys(int(seed), int(layer), int(probe))
    counters = torch.arange(numel, dtype=torch.int64, device=device)
    return values(counters, k0, k1, distribution, dtype).reshape(shape)
