"""Build script: the package, plus the native extension ``ofa_kernels._C`` from csrc/ when possible.

- CUDA torch and nvcc (``CUDA_HOME``): CPU + CUDA kernels, for ``TORCH_CUDA_ARCH_LIST`` or the
  visible GPUs' architectures, else sm_80 and sm_90.
- CPU torch, or no nvcc: the CPU kernels only (one line says why).
- No C++ compiler, no importable torch (build with ``--no-build-isolation``), or a failed build:
  pure Python (the torch and Triton backends), with a one-line message.
- ``OFA_NO_EXT=1`` skips the extension; ``OFA_FORCE_CUDA=1`` builds the CUDA kernels even where no
  GPU is visible (needs a CUDA torch and nvcc).
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup


def say(message: str) -> None:
    print(f"ofa_kernels: {message}", file=sys.stderr)


def native_extension():
    """(ext_modules, cmdclass) for the build, or ([], {}) for a pure-Python install."""
    if os.environ.get("OFA_NO_EXT") == "1":
        say("OFA_NO_EXT=1: pure Python install (torch and Triton backends)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        say("torch is not importable at build time (install torch first, build with --no-build-isolation): "
            "pure Python install")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        say("no C++ compiler found: pure Python install (torch and Triton backends)")
        return [], {}
    force = os.environ.get("OFA_FORCE_CUDA") == "1"
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None:
        with_cuda, why = False, "torch is a CPU build"
    elif not nvcc:
        with_cuda, why = False, "nvcc not found (set CUDA_HOME)"
    elif not (force or torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        with_cuda, why = False, "no GPU visible and no TORCH_CUDA_ARCH_LIST (OFA_FORCE_CUDA=1 builds anyway)"
    else:
        with_cuda, why = True, ""
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    cxx_flags = ["-O3", "-fopenmp"]
    sources = ["csrc/bindings.cpp", "csrc/cpu/norm.cpp", "csrc/cpu/probe.cpp"]
    if with_cuda:
        cxx_flags.append("-DOFA_WITH_CUDA")
        sources += ["csrc/cuda/norm.cu", "csrc/cuda/probe.cu"]
        say(f"building the CPU + CUDA extension (archs: {os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
    else:
        say(f"building the CPU extension only: {why}")
    Extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = Extension(
        "ofa_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DOFA_WITH_CUDA", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )

    class BuildOrFallBack(cpp_extension.BuildExtension):
        """A failed native build leaves a working pure-Python install, and says so."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors surface as various distutils/subprocess errors
                say(f"native extension build failed ({type(exc).__name__}: {exc}); pure Python install")

    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": BuildOrFallBack.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
