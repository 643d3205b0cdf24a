"""The native extension: built where a compiler is, and every CUDA file compiles with nvcc -c."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ofa_kernels.native import load

ROOT = Path(__file__).resolve().parents[1]
CUDA_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which("nvcc") or (str(Path(home) / "bin" / "nvcc") if (Path(home) / "bin" / "nvcc").exists() else None)
    return found


def test_the_extension_is_built_where_a_compiler_is():
    if os.environ.get("OFA_NO_EXT") == "1" or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler, or OFA_NO_EXT=1: the pure-Python install is the expected one")
    module, reason = load()
    assert module is not None, reason
    from ofa_kernels import backends

    assert backends()["cpu"]["available"]


@pytest.mark.skipif(not CUDA_FILES, reason="no CUDA sources")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_FILES, ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA kernels cannot be compiled here")
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-DOFA_WITH_CUDA", f"-arch={arch}", str(source), "-o",
           str(tmp_path / (source.stem + ".o"))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


@pytest.mark.slow
def test_pip_wheel_builds_and_ships_the_extension(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None or os.environ.get("OFA_NO_EXT") == "1":
        pytest.skip("no C++ compiler, or OFA_NO_EXT=1")
    import sys
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (wheel,) = tmp_path.glob("ofa_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("ofa_kernels/_C") and n.endswith(".so") for n in names), names
