"""The CUDA kernels of csrc/cuda compiled as C++ against a CPU emulation (csrc/emu), for tests.

``build(dir)`` compiles them with g++ into a shared library; ``EmulatedCuda`` wraps it with the same
methods as the compiled extension ``ofa_kernels._C`` (the tensors are CPU tensors standing in for device
memory), so ``ofa_kernels.native``'s wrappers run the CUDA kernels unchanged.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import torch

from ofa_kernels.precision import acc_dtype as _acc

ROOT = Path(__file__).resolve().parents[1]
_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-fno-gnu-unique", "-pthread", "-DOFA_WITH_CUDA", "-DOFA_CUDA_EMU"]
_DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def build(out_dir: Path) -> Path:
    """Compiles csrc/cuda/*.cu and csrc/emu/entry.cpp (in parallel) and links them; returns the library.
    ``-fno-gnu-unique``: a copy of the file loaded beside it keeps its own statics (GCC would share them)."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [ROOT / "csrc" / "emu" / "entry.cpp"]
    objects, jobs = [], []
    for src in sources:
        obj = out_dir / (src.name + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        jobs.append(subprocess.Popen(["g++", *_FLAGS, "-c", *lang, str(src), "-o", str(obj)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        objects.append(obj)
    for job, src in zip(jobs, sources, strict=True):
        out, _ = job.communicate()
        if job.returncode:
            raise RuntimeError(f"g++ failed on {src.name}:\n{out}")
    lib = out_dir / "libofa_cuda_emu.so"
    subprocess.run(["g++", "-shared", "-pthread", *map(str, objects), "-o", str(lib)], check=True)
    return lib


def _vec(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(acc).contiguous()


def _summed(part: torch.Tensor | None) -> torch.Tensor | None:
    return None if part is None else part[0] if part.shape[0] == 1 else part.sum(0)


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _s(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


class EmulatedCuda:
    """The ``ofa_kernels._C`` interface on the emulated CUDA kernels (the tensors are CPU tensors)."""

    def __init__(self, lib: Path, sm_count: int = 3, blocks_per_sm: int = 2, max_threads_per_block: int = 1024,
                 threads_per_sm: int = 0):
        """``lib``: from ``build`` (its launch caches live as long as the process: configure a copy of the
        file for a differently sized emulated GPU). ``max_threads_per_block``: the limit the kernels'
        registers allow, as ``cudaFuncGetAttributes`` reports it. ``threads_per_sm``: when set, the occupancy
        query answers min(32, threads_per_sm / CTA threads), a real SM's thread and CTA limits, instead of
        ``blocks_per_sm``."""
        self.lib = ctypes.CDLL(str(lib))
        i64, i32, dbl, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        sig = {
            "emu_num_parts": (i64, i64, i32, i32, i32),
            "emu_norm_fwd": (i64, i64, i32, dbl, i32, i32, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, dbl, i32),
            "emu_norm_bwd": (i64, i64, i32, dbl, i32, i32, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr,
                             i32, i32),
            "emu_norm_bwd_bwd": (i64, i64, i32, dbl, i32, i32, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr,
                                 ptr, ptr, i64, ptr, i64, ptr, i32),
            "emu_probe_perturb": (i32, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, dbl, i32, i32, i32),
        }
        for name, args in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = list(args), ctypes.c_int
        self.lib.emu_error.restype = ctypes.c_char_p
        self.lib.emu_configure(sm_count, blocks_per_sm, max_threads_per_block, threads_per_sm)

    def _ok(self, rc: int) -> None:
        if rc:
            raise RuntimeError(self.lib.emu_error().decode())

    @staticmethod
    def with_cuda() -> bool:
        return True

    def _num_parts(self, x, y_like, double_backward):
        parts = self.lib.emu_num_parts(x.shape[0], x.shape[1], _DTYPE[x.dtype], _DTYPE[y_like.dtype],
                                       int(double_backward))
        if parts < 0:
            raise RuntimeError(self.lib.emu_error().decode())
        return parts

    # The allocating entry points of csrc/bindings.cpp, mirrored here over the emulated kernels.

    def forward(self, x, w, b, eps, offset, is_rms, cast_mode, y_dtype):
        M, N = x.shape
        acc = _acc(x.dtype)
        y = torch.empty(M, N, dtype=y_dtype)
        rstd, mean = torch.empty(M, dtype=acc), torch.empty(0 if is_rms else M, dtype=acc)
        w, b = _vec(w, acc), _vec(b, acc)
        if M:
            self._ok(self.lib.emu_norm_fwd(M, N, is_rms, offset, _DTYPE[x.dtype], _DTYPE[y.dtype], _p(x), _s(x),
                                           _p(w), _p(b), _p(rstd if is_rms else mean), _p(rstd), _p(y), _s(y), eps,
                                           cast_mode))
        return y, mean, rstd

    def backward(self, dy, x, w, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db):
        M, N = x.shape
        acc = _acc(x.dtype)
        parts = self._num_parts(x, dy, False)
        dx = torch.empty(M, N, dtype=x.dtype) if need_dx else None
        dw_part = torch.empty(parts, N, dtype=acc) if need_dw else None
        db_part = torch.empty(parts, N, dtype=acc) if need_db else None
        w = _vec(w, acc)
        if M or need_dw or need_db:
            self._ok(self.lib.emu_norm_bwd(M, N, is_rms, offset, _DTYPE[x.dtype], _DTYPE[dy.dtype], _p(x), _s(x),
                                           _p(w), _p(rstd if is_rms else mean), _p(rstd), _p(dy), _s(dy), _p(dx),
                                           _s(dx), _p(dw_part), _p(db_part), parts, cast_mode))
        return dx, _summed(dw_part), _summed(db_part)

    def double_backward(self, dy, x, w, mean, rstd, a, bw, e, offset, is_rms, need_ddy, need_dx, need_dw):
        M, N = x.shape
        acc = _acc(x.dtype)
        need_dw = need_dw and a is not None
        parts = self._num_parts(x, dy, True)
        d_dy = torch.empty(M, N, dtype=dy.dtype) if need_ddy else None
        d_x = torch.empty(M, N, dtype=x.dtype) if need_dx else None
        dw_part = torch.empty(parts, N, dtype=acc) if need_dw else None
        w, bw, e = _vec(w, acc), _vec(bw, acc), _vec(e, acc)
        if need_ddy or need_dx or need_dw:
            self._ok(self.lib.emu_norm_bwd_bwd(M, N, is_rms, offset, _DTYPE[x.dtype], _DTYPE[dy.dtype], _p(x),
                                               _s(x), _p(w), _p(rstd if is_rms else mean), _p(rstd), _p(dy), _s(dy),
                                               _p(a), _s(a), _p(bw), _p(e), _p(d_dy), _s(d_dy), _p(d_x), _s(d_x),
                                               _p(dw_part), parts))
        return d_dy, d_x, _summed(dw_part)

    def probe_perturb(self, x, y, gamma, scale, keys, rows_per_probe, row_offset, eps, scale_by_rms, add_x,
                      gaussian):
        M, N = x.shape
        self._ok(self.lib.emu_probe_perturb(_DTYPE[x.dtype], _p(x), _s(x), _p(y), _s(y), _p(gamma), _p(scale),
                                            _p(keys), M, N, rows_per_probe, row_offset, eps, int(scale_by_rms),
                                            int(add_x), int(gaussian)))
