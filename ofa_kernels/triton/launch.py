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

Launch sites name every argument (``launcher(grid, num_warps, X=x, ...)``); the Launcher orders them
once into the kernel's runtime arguments and constexprs (from its signature), and both modes pass
those positionally, so the interpreter tests check the argument order that the direct path uses. An
absent optional pointer is given as ``pointer_or(t, stand_in)``.
"""

from __future__ import annotations

import inspect
import operator
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


def pointer_or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``t``, or where it is absent a tensor of the same launch standing in for it: a kernel argument must
    be a pointer, and the kernel never reads this one (its HAS_ / NEED_ constexpr is off)."""
    return stand_in if t is None else t


def _getter(names: tuple[str, ...]):
    """A dict's values at ``names``, as a tuple (``itemgetter`` of one name returns the bare value)."""
    get = operator.itemgetter(*names)
    return get if len(names) > 1 else (lambda d: (get(d),)) if names else (lambda d: ())


class Launcher:
    """Calls one ``@triton.jit`` kernel with every argument named: ``launcher(grid, num_warps, X=x, ...)``.

    The kernel's signature (its constexprs declared last) fixes the order once; ``launch`` takes the
    ordered ``args`` (runtime arguments) and ``constexprs`` as they reach the kernel. The grid is 1-D.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        # The Python function's signature (JIT and interpreter alike); annotations may be strings.
        params = list(inspect.signature(kernel.fn).parameters.values())
        flags = ["constexpr" in str(p.annotation) for p in params]
        if flags != sorted(flags):
            raise ValueError(f"{kernel.fn.__name__}: Launcher needs the constexpr parameters last")
        self.name, self.n_args, self.n_constexprs = kernel.fn.__name__, flags.count(False), flags.count(True)
        self.arg_names = tuple(p.name for p, c in zip(params, flags) if not c)
        self.constexpr_names = tuple(p.name for p, c in zip(params, flags) if c)
        self._args, self._constexprs = _getter(self.arg_names), _getter(self.constexpr_names)
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: int, num_warps: int, **arguments) -> None:
        self.launch(grid, *self.ordered(arguments), num_warps)

    def ordered(self, arguments: dict) -> tuple[tuple, tuple]:
        """(runtime arguments, constexprs) in the kernel's order; a TypeError names a missing or unknown one."""
        if len(arguments) == self.n_args + self.n_constexprs:
            try:
                return self._args(arguments), self._constexprs(arguments)
            except KeyError:
                pass
        names = set(self.arg_names + self.constexpr_names)
        missing, unknown = sorted(names - set(arguments)), sorted(set(arguments) - names)
        raise TypeError(f"{self.name}: missing arguments {missing}, unknown arguments {unknown}")

    def launch(self, grid: int, args: tuple, constexprs: tuple, num_warps: int) -> None:
        """The launch with the arguments ordered (``ordered``): through the JIT, or the compiled launcher."""
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

    def compile_for(self, target, num_warps: int, **arguments):
        """Compiles the kernel ahead of time for ``target`` (a ``triton.backends.compiler.GPUTarget``: no GPU
        needed) as a launch with these named arguments would: Triton's own binder specialises them (pointer dtype
        and 16-byte alignment, integers equal to 1 or divisible by 16). Returns the ``CompiledKernel``;
        its ``asm["cubin"]`` holds what ptxas made (registers, spills: ``benchmarks/kernel_resources.py``).
        Written against Triton 3.6's JIT internals."""
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        args, constexprs = self.ordered(arguments)
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
