"""The CUDA kernels (csrc/cuda) run here: compiled with g++ against a CPU emulation of the CUDA features
they use (csrc/emu/cuda_emu.h: threads, __syncthreads, warp shuffles, shared memory), driven through
``ofa_kernels.native``'s own wrappers and checked against the plain-PyTorch backend, for every launch
path: 16-byte vectors or scalars, 1/2/4/8 register-cached vectors per thread, the looped path with its
weight-gradient accumulator in shared memory or in the CTA's partial row, persistent grids striding over
more rows than CTAs. Speed is a GPU question (benchmarks/); these check the indexing and reductions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cuda_emu
from ofa_kernels.eager import norm as eager
from ofa_kernels.eager import probe as eager_probe
from ofa_kernels.native import norm as native
from ofa_kernels.native import probe as native_probe
from ofa_kernels.precision import acc_dtype as _acc
from ofa_kernels.precision import norm_spec

M = 13  # more rows than the emulated GPU's 3 SMs x 2 CTAs: every CTA strides over rows

# width -> the path it takes (fwd aims at 4 vectors per thread, the backward kernels at 2; up to 1024
# threads, then the looped path): scalar (odd widths) or 16-byte vectors.
WIDTHS = {
    "vec, 1 item": 40,
    "scalar, 2-4 items": 77,
    "vec, 4 items": 1000,
    "scalar, 8 items": 5001,
    "scalar, looped": 8195,
}


@pytest.fixture
def cuda_kernels(emulated, monkeypatch):
    """ofa_kernels.native's wrappers calling the emulated CUDA kernels."""
    return _use(emulated, monkeypatch)


def _use(emulated, monkeypatch):
    monkeypatch.setattr(native, "_LOADED", [emulated])
    monkeypatch.setattr(native_probe, "load", lambda: (emulated, "emulated CUDA kernels"))
    return emulated


TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1e-2),
       torch.float16: (2e-3, 2e-3)}


def _close(got, want):
    """Equal up to the output dtype's rounding (summation order differs from PyTorch's)."""
    assert (got is None) == (want is None)
    if got is None:
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOL[got.dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale)


def _inputs(N, dtype, strided):
    x = torch.randn(M, N + (5 if strided else 0), dtype=dtype) * 2 + 0.5
    x = x[:, :N] if strided else x
    w, b = torch.rand(N) + 0.5, torch.randn(N)
    return x, w, b


CASES = [  # (path, dtype, is_rms, cast_mode, strided)
    *[(path, torch.float32, rms, "llama" if rms else "none", False) for path in WIDTHS for rms in (True, False)],
    *[(path, torch.bfloat16, rms, "llama" if rms else "none", False) for path in WIDTHS for rms in (True, False)],
    ("vec, 4 items", torch.float16, True, "gemma", False),
    ("vec, 4 items", torch.float16, False, "none", True),
    ("scalar, 2-4 items", torch.float64, True, "none", False),
    ("vec, 4 items", torch.float64, False, "none", True),
    ("vec, 1 item", torch.bfloat16, True, "llama", True),
]


def _ids(case):
    path, dtype, rms, mode, strided = case
    return f"{'rms' if rms else 'layer'}-{str(dtype)[6:]}-{mode}-{path.replace(', ', '-')}{'-strided' if strided else ''}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_backward_and_double_backward_match_plain_pytorch(cuda_kernels, case):
    _check_all_stages(case)


@pytest.mark.parametrize("rows", ["1", "2", "3", "8"])
@pytest.mark.parametrize("case", [("vec, 1 item", torch.bfloat16, True, "llama", False),
                                  ("scalar, 2-4 items", torch.float32, False, "none", True)], ids=_ids)
def test_any_number_of_rows_per_cta(cuda_kernels, monkeypatch, case, rows):
    """Short rows run several per CTA (one group of threads each); the count is forced here: 1 (a CTA per
    row), 2 (13 rows over 6 CTAs: grid-stride), 3 (groups that are not a power of two), 8 (groups with
    no row in the last CTA)."""
    monkeypatch.setenv("OFA_CUDA_ROWS_PER_CTA", rows)
    _check_all_stages(case)


@pytest.mark.parametrize("case", [("vec, 4 items", torch.bfloat16, True, "llama", False),
                                  ("scalar, 8 items", torch.float32, False, "none", False)], ids=_ids)
def test_rows_whose_threads_the_registers_cannot_launch_take_the_looped_path(emulated, monkeypatch,
                                                                              tmp_path, case):
    """A kernel using over 64 registers per thread cannot launch 1024 threads (nor, here, over 64): the plan
    asks cudaFuncGetAttributes and falls back to fewer rows per CTA, or to the looped path."""
    lib = tmp_path / "small_register_file.so"
    lib.write_bytes(Path(emulated.lib._name).read_bytes())  # a second copy: its own launch caches
    _use(cuda_emu.EmulatedCuda(lib, max_threads_per_block=64), monkeypatch)
    _check_all_stages(case)


def test_rows_per_cta_keep_the_most_threads_resident_with_the_fewest_rows(emulated, monkeypatch, tmp_path):
    """The plan's rule on an SM that holds 2048 threads in at most 32 CTAs: a 32-thread row fits 32 CTAs of
    one row (32 warps), or 2, 4 or 8 rows per CTA (64 warps each): 2 rows, the fewest of the best; halved
    while that would leave some of the 3 SMs without a CTA; the override wins. Seen through the grid the
    backward launches (num_parts: CTAs = partial rows)."""
    lib = tmp_path / "real_occupancy.so"
    lib.write_bytes(Path(emulated.lib._name).read_bytes())
    gpu = cuda_emu.EmulatedCuda(lib, sm_count=3, threads_per_sm=2048)
    x = torch.randn(13, 40, dtype=torch.bfloat16)  # 5 vectors a row: 32 threads, 1 item (backward)
    monkeypatch.delenv("OFA_CUDA_ROWS_PER_CTA", raising=False)
    assert gpu._num_parts(x, x, False) == 7  # 13 rows at 2 per CTA
    assert gpu._num_parts(x[:4], x[:4], False) == 4  # 2 per CTA would leave an SM idle: 1
    monkeypatch.setenv("OFA_CUDA_ROWS_PER_CTA", "8")
    assert gpu._num_parts(x, x, False) == 2
    for bad in ("0", "two", "4x"):
        monkeypatch.setenv("OFA_CUDA_ROWS_PER_CTA", bad)
        with pytest.raises(RuntimeError, match=f"OFA_CUDA_ROWS_PER_CTA must be a whole number .* got '{bad}'"):
            gpu._num_parts(x, x, False)


def _check_all_stages(case):
    path, dtype, is_rms, cast_mode, strided = case
    N = WIDTHS[path]
    x, w, b = _inputs(N, dtype, strided)
    bias = None if is_rms else b
    offset = 1.0 if cast_mode == "gemma" else 0.0
    out_dtype = torch.promote_types(dtype, w.dtype) if is_rms and cast_mode != "gemma" else dtype
    spec = norm_spec(is_rms, offset, cast_mode)
    got = native.norm_fwd(x, w, bias, 1e-5, spec, out_dtype)
    want = eager.norm_fwd(x, w, bias, 1e-5, spec, out_dtype)
    for g, r in zip(got, want, strict=True):
        _close(g, r)
    _, mean, rstd = want

    dy = torch.randn(M, N, dtype=out_dtype)
    bwd_args = (dy, x, w, mean, rstd, spec, (True, True, not is_rms))
    for g, r in zip(native.norm_bwd(*bwd_args), eager.norm_bwd(*bwd_args), strict=True):
        _close(g, r)

    a, bw, e = torch.randn(M, N, dtype=dtype), torch.randn(N, dtype=_acc(dtype)), torch.randn(N, dtype=_acc(dtype))
    bb_args = (dy, x, w, mean, rstd, (a, bw, None if is_rms else e), spec.unrounded(), (True, True, True))
    for g, r in zip(native.norm_bwd_bwd(*bb_args), eager.norm_bwd_bwd(*bb_args), strict=True):
        _close(g, r)


@pytest.mark.parametrize("path", ["vec, 4 items", "scalar, looped"])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["dx only", "dw+db only", "db only"])
def test_backward_computes_only_what_is_asked(cuda_kernels, path, needs):
    N = WIDTHS[path]
    x, w, _ = _inputs(N, torch.float32, False)
    layer = norm_spec(False)
    _, mean, rstd = eager.norm_fwd(x, w, None, 1e-5, layer, torch.float32)
    args = (torch.randn(M, N), x, w, mean, rstd, layer, needs)
    for g, r in zip(native.norm_bwd(*args), eager.norm_bwd(*args), strict=True):
        _close(g, r)


@pytest.mark.parametrize("no_weight", [True, False], ids=["no weight", "weight"])
def test_double_backward_with_missing_cotangents(cuda_kernels, no_weight):
    N = WIDTHS["scalar, 2-4 items"]
    x, w, _ = _inputs(N, torch.float32, False)
    w = None if no_weight else w
    rms = norm_spec(True)
    _, mean, rstd = eager.norm_fwd(x, w, None, 1e-5, rms, torch.float32)
    args = (torch.randn(M, N), x, w, mean, rstd, (None, torch.randn(N), None), rms, (True, True, not no_weight))
    for g, r in zip(native.norm_bwd_bwd(*args), eager.norm_bwd_bwd(*args), strict=True):
        _close(g, r)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_perturbation_matches_the_host_generator(cuda_kernels, distribution, dtype):
    x = torch.randn(M, 300, dtype=dtype)
    gamma = torch.rand(300) + 0.5
    keys = torch.randint(0, 2**31, (5, 2))
    args = (x, gamma, 1e-2, keys, 3, distribution, True, True, 1)
    y, scale = native_probe.probe_perturb(*args)
    y_ref, scale_ref = eager_probe.probe_perturb(*args)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if distribution == "rademacher" and dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
    else:  # Box-Muller's logf/cosf may differ in the last bit; 16-bit outputs by one rounding
        _close(y, y_ref)


def test_a_launch_the_gpu_would_refuse_is_reported(emulated):
    """The emulation refuses launches the driver would (here a grid of 0 CTAs), and the error reaches Python."""
    x, dy, dx, rstd = torch.randn(2, 8), torch.randn(2, 8), torch.empty(2, 8), torch.ones(2)
    rc = emulated.lib.emu_norm_bwd(2, 8, 1, 0.0, 2, 2, x.data_ptr(), 8, None, rstd.data_ptr(), rstd.data_ptr(),
                                   dy.data_ptr(), 8, dx.data_ptr(), 8, None, None, 0, 2)
    with pytest.raises(RuntimeError, match="norm_bwd launch: invalid launch: grid 0"):
        emulated._ok(rc)
