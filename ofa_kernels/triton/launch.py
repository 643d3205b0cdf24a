"""Launching a Triton kernel: through the JIT (default) or straight through its compiled launcher.

``kernel[grid](*args)`` binds every argument, specialises it (pointer dtype and 16-byte alignment,
integers equal to 1 or divisible by 16), hashes a cache key with the options and looks the compiled
kernel up, on every call, before the launch itself (RESULTS.md, "Built since, waiting for a GPU",
has the host time of both paths). ``Launcher`` keeps the compiled kernel of each specialisation it
has seen and calls its launcher (``CompiledKernel.run``) directly, keyed by a cheaper tuple that separates every case Triton
separates: the current device, ``num_warps``, the constexpr values, and per runtime argument its
dtype and alignment (tensors) or its ``== 1``, ``% 16 == 0`` and 32-bit range (integers).

Modes (``OFA_TRITON_LAUNCH``, read at import; ``set_mode`` to change): "jit" (default) always goes
through ``kernel[grid]``; "direct" uses the compiled launcher on CUDA and falls back to the JIT for a
shape's first call (which compiles), under ``TRITON_INTERPRET=1`` (the interpreter has no launcher),
while a launch hook is installed (profilers read metadata the JIT builds), and on a Triton whose
launcher signature this module was not written against. "direct" stays opt-in until
``benchmarks/gpu_check.sh`` has run the GPU op tests and the host-time bench with it.

Both modes pass the same positional arguments (runtime arguments, then constexprs, in the kernel's
order), so the interpreter tests check the argument order that the direct path uses.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

MODES = ("jit", "direct")
_LAUNCHER_ABI = ("3.6.",)  # Triton versions whose CompiledKernel.run(grid..., stream, function, ...) is known
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_mode = "jit"
_direct = False  # "direct" requested and possible here (set by set_mode)


def set_mode(mode: str) -> None:
    """"jit" or "direct" (see the module docstring)."""
    global _mode, _direct
    if mode not in MODES:
        raise ValueError(f"OFA_TRITON_LAUNCH / launch mode must be one of {MODES}, got {mode!r}")
    _mode = mode
    _direct = mode == "direct" and direct_supported()


def mode() -> str:
    return _mode


def direct_supported() -> bool:
    """Whether "direct" can take effect here (else it launches through the JIT)."""
    return not _INTERPRETED and triton.__version__.startswith(_LAUNCHER_ABI)


set_mode(os.environ.get("OFA_TRITON_LAUNCH", "jit"))


def _spec(arg) -> object:
    """What Triton specialises a runtime argument on (a superset of it: the same key, the same kernel)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    if type(arg) is int:
        return 1 if arg == 1 else (arg & 15 == 0, -2147483648 <= arg < 2147483648)
    return type(arg)  # floats and bools: specialised on type only


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _installed(hook) -> bool:
    """Triton 3.6 keeps its launch hooks as ``HookChain``s (empty when nothing is installed)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _no_hooks() -> bool:
    runtime = triton.knobs.runtime
    return not (_installed(runtime.launch_enter_hook) or _installed(runtime.launch_exit_hook))


class Launcher:
    """Calls one ``@triton.jit`` kernel: ``launcher(grid, args, constexprs, num_warps)``.

    ``args`` are the kernel's runtime arguments and ``constexprs`` its constexpr arguments, each in
    the kernel's order (the kernel declares its constexprs last). The grid is 1-D.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        # The Python function's signature (JIT and interpreter alike); annotations may be strings.
        flags = ["constexpr" in str(p.annotation) for p in inspect.signature(kernel.fn).parameters.values()]
        if flags != sorted(flags):
            raise ValueError(f"{kernel.fn.__name__}: Launcher needs the constexpr parameters last")
        self.name, self.n_args, self.n_constexprs = kernel.fn.__name__, flags.count(False), flags.count(True)
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: int, args: tuple, constexprs: tuple, num_warps: int) -> None:
        if not _direct or not _no_hooks():
            self._check(args, constexprs)
            self.kernel[(grid,)](*args, *constexprs, num_warps=num_warps)
            return
        device = _current_device()
        key = (device, num_warps, constexprs, tuple(map(_spec, args)))
        compiled = self.compiled.get(key)
        if compiled is None:  # first call of this specialisation: the JIT compiles (or loads) and launches
            self._check(args, constexprs)  # (a cached key had this call's argument counts)
            compiled = self.kernel[(grid,)](*args, *constexprs, num_warps=num_warps)
            if hasattr(compiled, "result"):  # asynchronous compilation hands back a future
                compiled = compiled.result()
            self.compiled[key] = compiled
            return
        compiled.run(grid, 1, 1, _current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *constexprs)

    def compile_for(self, target, args: tuple, constexprs: tuple, num_warps: int):
        """Compiles the kernel ahead of time for ``target`` (a ``triton.backends.compiler.GPUTarget``: no GPU
        needed) as a launch with these arguments would: Triton's own binder specialises them (pointer dtype
        and 16-byte alignment, integers equal to 1 or divisible by 16). Returns the ``CompiledKernel``;
        its ``asm["cubin"]`` holds what ptxas made (registers, spills: ``benchmarks/kernel_resources.py``).
        Written against Triton 3.6's JIT internals."""
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        self._check(args, constexprs)
        backend = make_backend(target)
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
        kwargs = {"num_warps": num_warps}
        bound, specialization, options = binder(*args, *constexprs, **kwargs)
        options, signature, constants, attrs = self.kernel._pack_args(backend, kwargs, bound, specialization, options)
        return triton.compile(ASTSource(self.kernel, signature, constants, attrs), target=target,
                              options=options.__dict__)

    def _check(self, args: tuple, constexprs: tuple) -> None:
        if len(args) != self.n_args or len(constexprs) != self.n_constexprs:
            raise TypeError(f"{self.name}: expected {self.n_args} runtime arguments and {self.n_constexprs} "
                            f"constexprs, got {len(args)} and {len(constexprs)}")
