"""Where the C++/CUDA sources are and how to compile them.

Shared by ``setup.py`` (ahead-of-time build) and :mod:`msd_kernels._loader` (build on
first import). Imports nothing but the standard library so setup.py can load it
without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

# CUDA architectures built when TORCH_CUDA_ARCH_LIST is not set: Ampere and Hopper.
DEFAULT_CUDA_ARCHS = "8.0;9.0"

# -fopenmp: torch's CPU build runs at::parallel_for through OpenMP pragmas inlined from
# ATen/ParallelOpenMP.h; without the flag g++ ignores them and every "parallel" loop of
# the CPU kernels runs on one thread. The GOMP symbols resolve to the libgomp torch loads.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]


def find_csrc(package_dir: Path) -> Path:
    """The csrc folder: shipped inside the wheel as ``_csrc``, or the checkout's ``csrc``."""
    for candidate in (package_dir / "_csrc", package_dir.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"msd_kernels: no C++ sources found next to {package_dir} (looked for _csrc/ and ../csrc/)"
    )


def extension_sources(csrc: Path, with_cuda: bool) -> list[str]:
    """Every source of the extension: the registration file, CPU ops, and CUDA ops."""
    sources = [csrc / "ops.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((csrc / "cuda").glob("*.cu")) + sorted((csrc / "cuda").glob("*.cpp"))
    return [str(path) for path in sources]


def include_dirs(csrc: Path) -> list[str]:
    return [str(csrc), str(csrc / "include")]


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
