"""The Triton launcher cache (ofa_kernels/triton/launch.py), checked without a GPU: a stand-in kernel
records what the JIT and the compiled launcher receive. The real kernels' argument order is checked
by every Triton op test (both modes pass the same positional arguments)."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from ofa_kernels.triton import launch


def _kernel_fn(X, Y, n, eps, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    pass


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, object(), object()

    def run(self, *args):
        self.log.append(("direct",) + args)


class _Kernel:
    """Stands in for a JITFunction: ``kernel[grid](*args, num_warps=)`` logs and returns a compiled kernel."""

    fn = staticmethod(_kernel_fn)

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, num_warps):
            self.log.append(("jit", grid, num_warps) + args)
            return _Compiled(self.log)
        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRETED", False)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234 + device)
    launch.set_mode("direct")
    yield
    launch.set_mode("jit")


def test_jit_mode_passes_runtime_args_then_constexprs_positionally():
    kernel = _Kernel()
    x = torch.zeros(8)
    for _ in range(2):
        launch.Launcher(kernel).launch(3, (x, x, 5, 1e-6), (True, 64), 4)
    assert kernel.log == [("jit", (3,), 4, x, x, 5, 1e-6, True, 64)] * 2


def test_direct_mode_reuses_the_compiled_kernel_of_a_seen_specialisation(direct):
    kernel = _Kernel()
    launcher = launch.Launcher(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    launcher.launch(3, (x, y, 32, 1e-6), (True, 64), 4)
    launcher.launch(7, (y, x, 48, 1e-5), (True, 64), 4)  # same dtypes, alignment, int class: no JIT
    assert [e[0] for e in kernel.log] == ["jit", "direct"]
    _, grid, g1, g2, stream, function, metadata, launch_meta, enter, exit_, *args = kernel.log[1]
    compiled = launcher.compiled[next(iter(launcher.compiled))]
    assert (grid, g1, g2, stream) == (7, 1, 1, 1234)
    assert function is compiled.function and metadata is compiled.packed_metadata
    assert (launch_meta, enter, exit_) == (None, None, None)
    assert args == [y, x, 48, 1e-5, True, 64]


def test_direct_mode_compiles_again_wherever_triton_would_specialise_differently(direct):
    kernel = _Kernel()
    launcher = launch.Launcher(kernel)
    x = torch.zeros(64)
    base = ((x, x, 32, 1e-6), (True, 64), 4)
    changes = [
        ((x[1:], x, 32, 1e-6), (True, 64), 4),  # misaligned pointer
        ((x.double(), x, 32, 1e-6), (True, 64), 4),  # pointer dtype
        ((x, x, 1, 1e-6), (True, 64), 4),  # an int equal to 1
        ((x, x, 33, 1e-6), (True, 64), 4),  # an int not divisible by 16
        ((x, x, 2**32, 1e-6), (True, 64), 4),  # an int past 32 bits
        ((x, x, 32, 1e-6), (False, 64), 4),  # a constexpr
        ((x, x, 32, 1e-6), (True, 128), 4),  # another constexpr value, also divisible by 16
        ((x, x, 32, 1e-6), (True, 64), 8),  # num_warps
    ]
    for args, consts, warps in [base] + changes:
        launcher.launch(1, args, consts, warps)
    assert [e[0] for e in kernel.log] == ["jit"] * (1 + len(changes))
    for args, consts, warps in [base] + changes:  # every one of them is cached now
        launcher.launch(1, args, consts, warps)
    assert [e[0] for e in kernel.log[len(changes) + 1:]] == ["direct"] * (1 + len(changes))


def test_the_cache_key_separates_every_case_tritons_own_specialisation_does():
    x = torch.zeros(64)
    samples = [x, x[1:], x[4:], x.half(), x.double(), torch.zeros(0), 0, 1, 2, 16, 17, -16, -1, 2**31 - 1, 2**31,
               -(2**31), -(2**31) - 1, 2**40, 0.0, 1.0, 3.5]
    for a, b in itertools.combinations(samples, 2):
        theirs = [native_specialize_impl(BaseBackend, v, False, True, True) for v in (a, b)]
        if theirs[0] != theirs[1]:
            assert launch._spec(a) != launch._spec(b), (a, b, theirs)


def test_direct_mode_goes_through_the_jit_while_a_launch_hook_is_installed(direct, monkeypatch):
    kernel = _Kernel()
    launcher = launch.Launcher(kernel)
    x = torch.zeros(64)
    launcher.launch(1, (x, x, 32, 1e-6), (True, 64), 4)
    launcher.launch(1, (x, x, 32, 1e-6), (True, 64), 4)  # Triton's empty hook chains count as none
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_exit_hook.add(hook)
    try:
        launcher.launch(1, (x, x, 32, 1e-6), (True, 64), 4)
    finally:
        triton.knobs.runtime.launch_exit_hook.remove(hook)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)  # a plain callable, as older Tritons
    launcher.launch(1, (x, x, 32, 1e-6), (True, 64), 4)
    assert [e[0] for e in kernel.log] == ["jit", "direct", "jit", "jit"]


def test_direct_mode_is_inert_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRETED", True)
    launch.set_mode("direct")
    try:
        kernel = _Kernel()
        x = torch.zeros(64)
        for _ in range(2):
            launch.Launcher(kernel).launch(1, (x, x, 32, 1e-6), (True, 64), 4)
        assert [e[0] for e in kernel.log] == ["jit", "jit"] and not launch.direct_supported()
    finally:
        launch.set_mode("jit")


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="_kernel_fn: expected 4 runtime arguments and 2 constexprs, got 3 and 2"):
        launch.Launcher(_Kernel()).launch(1, (1, 2, 3), (True, 64), 4)
    with pytest.raises(ValueError, match="must be one of"):
        launch.set_mode("fast")

    class Misordered(_Kernel):
        @staticmethod
        def fn(X, FLAG: tl.constexpr, n):
            pass

    with pytest.raises(ValueError, match="constexpr parameters last"):
        launch.Launcher(Misordered())


def test_named_arguments_reach_the_kernel_in_its_order_and_a_wrong_name_is_refused():
    kernel = _Kernel()
    launcher = launch.Launcher(kernel)
    x, y = torch.zeros(8), torch.ones(8)
    launcher(3, 4, BLOCK=64, eps=1e-6, Y=y, FLAG=True, n=5, X=x)  # any order of names
    assert kernel.log == [("jit", (3,), 4, x, y, 5, 1e-6, True, 64)]
    assert launcher.ordered({"X": x, "Y": y, "n": 5, "eps": 1e-6, "FLAG": True, "BLOCK": 64}) == \
        ((x, y, 5, 1e-6), (True, 64))
    with pytest.raises(TypeError, match=r"missing arguments \['eps'\], unknown arguments \['epsilon'\]"):
        launcher(3, 4, BLOCK=64, epsilon=1e-6, Y=y, FLAG=True, n=5, X=x)
    with pytest.raises(TypeError, match=r"missing arguments \['BLOCK'\], unknown arguments \[\]"):
        launcher(3, 4, eps=1e-6, Y=y, FLAG=True, n=5, X=x)
    assert launch.pointer_or(None, x) is x and launch.pointer_or(y, x) is y
