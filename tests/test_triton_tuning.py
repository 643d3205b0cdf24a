"""The Triton launch configuration: the measured tuning table (``triton/tuning.py``), the launch-size
helpers, the default warps and the backward's column chunks (moved here from test_norm_ops.py)."""

from __future__ import annotations

import torch
from conftest import DEVICE

import ofa_kernels
from ofa_kernels.reference import layer_norm_ref, rms_norm_ref


def test_the_measured_launch_table_picks_each_entrys_path_and_stays_correct(monkeypatch):
    """Entries of the tuned table (here a synthetic one for the interpreter) select their paths (rows
    per program, looped chunks, where dW is summed); a width between two measured ones takes the
    lower one's knobs with as many elements per tile; every entry's path matches fp64."""
    import ofa_kernels.triton.norm as tnorm
    from ofa_kernels.triton import tuning

    f64 = {"32": {"rows_per_program": 4, "num_warps": 1},
           "64": {"rows_per_program": 2, "max_block_n": 16, "reduce_in_kernel": False}}
    synthetic = {"interpreter": {"fwd": {"float64": f64}, "bwd": {"float64": f64}, "bwd_bwd": {"float64": f64}}}
    monkeypatch.setattr(tuning, "table", lambda: synthetic)
    tuning.knobs.cache_clear()
    try:
        x32 = torch.randn(9, 32, dtype=torch.float64, device=DEVICE)
        assert tnorm._config(x32, "bwd", None, None)[:4] == (4, 32, True, 1)  # the entry at 32
        x48 = torch.randn(9, 48, dtype=torch.float64, device=DEVICE)
        assert tnorm._config(x48, "bwd", None, None)[:3] == (2, 64, True)  # 32's knobs, 4 * 32 // 48 -> 2 rows
        x80 = torch.randn(9, 80, dtype=torch.float64, device=DEVICE)
        assert tnorm._config(x80, "bwd", None, None)[:3] == (1, 16, False)  # 64's: looped in 16-column chunks
        assert tnorm._config(x80, "bwd", None, 8)[0] == 8  # a launcher argument still wins
        for n in (32, 48, 80):
            x = torch.randn(7, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
            w = (torch.rand(n, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
            b = torch.randn(n, dtype=torch.float64, device=DEVICE).requires_grad_()
            v = torch.randn(7, n, dtype=torch.float64, device=DEVICE)
            for ours, ref in ((lambda x: ofa_kernels.layer_norm(x, w, b, backend="triton"),
                               lambda x: layer_norm_ref(x, w, b)),
                              (lambda x: ofa_kernels.rms_norm(x, w, backend="triton"), lambda x: rms_norm_ref(x, w))):
                got, want = [], []
                for f, out in ((ours, got), (ref, want)):
                    y = f(x)
                    gx, gw = torch.autograd.grad(y, [x, w], v, create_graph=True)  # fwd, bwd
                    out += [y, gx, gw, *torch.autograd.grad((gx * v).sum(), [x, w])]  # bwd_bwd
                for g, t in zip(got, want, strict=True):
                    torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-10)
    finally:
        tuning.knobs.cache_clear()


def test_the_packaged_launch_table_is_well_formed():
    from ofa_kernels.triton import tuning

    table = tuning.table()
    # no table is a state of its own (nothing measured yet: every launch takes the defaults); a table
    # that exists must hold entries, so the loop below never passes on an empty one
    assert bool(table) == tuning.TABLE_PATH.exists()
    if not table:
        assert tuning.knobs("sm90", "fwd", torch.bfloat16, 4096) == {}
    for arch, kernels in table.items():
        assert arch.startswith("sm") and set(kernels) <= {"fwd", "bwd", "bwd_bwd"}, arch
        for dtypes in kernels.values():
            assert set(dtypes) <= {"bfloat16", "float16", "float32"}
            for width, knobs in (e for widths in dtypes.values() for e in widths.items()):
                assert int(width) > 0 and set(knobs) <= set(tuning.KNOBS), (arch, width, knobs)


def test_launch_size_helpers_equal_tritons():
    import triton

    from ofa_kernels.triton.grid import cdiv, next_power_of_2

    for n in [*range(1, 300), 4095, 4096, 4097, 65535, 65536, 70000, 2**31 - 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_the_default_warp_rule_keeps_the_measured_winners_and_caps_the_accumulators():
    """Unmeasured cells: the 4096-wide bf16 winners stand (fwd 2 rows x 8 warps, bwd 2 x 4, bwd_bwd 2 x 16);
    wider backward rows get warps enough for <= 32 accumulator columns per thread (the 4-warp rule gave
    64 at 8192, where LayerNorm's backward was measured far below its anchors)."""
    from ofa_kernels.triton.norm import default_warps

    assert [default_warps(k, 2, 4096) for k in ("fwd", "bwd", "bwd_bwd")] == [8, 4, 16]
    assert [default_warps("bwd", 1, n) for n in (8192, 16384)] == [8, 16]
    assert default_warps("bwd", 4, 2048) == 4 and default_warps("fwd", 1, 64) == 1
    assert all(w & (w - 1) == 0 for k in ("fwd", "bwd", "bwd_bwd") for m in (1, 2, 3, 16) for n in (16, 1000, 16384)
               for w in [default_warps(k, m, n)])  # Triton wants a power of two


def test_the_backward_kernels_take_rows_past_8192_columns_in_chunks():
    """A 16384-column pass spilled 120 B-3 KB per thread in the backward kernels (ptxas, sm_90); they loop
    over 8192-column chunks past that, the forward keeps one pass to MAX_BLOCK_N; a knob still overrides."""
    from ofa_kernels.triton.norm import tile

    assert tile("fwd", 16384)[1:3] == (16384, True)
    assert [tile(k, 16384)[1:3] for k in ("bwd", "bwd_bwd")] == [(8192, False)] * 2
    assert [tile(k, 8192)[1:3] for k in ("bwd", "bwd_bwd")] == [(8192, True)] * 2
    assert tile("bwd", 16384, max_block_n=16384)[1:3] == (16384, True)
    assert tile("bwd", 65536)[1:4] == (8192, False, 8)  # the default warps of an 8192-column chunk
