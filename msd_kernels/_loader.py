"""Loading the compiled extension: ahead-of-time build if present, else build on import.

``pip install --no-build-isolation .`` compiles ``msd_kernels/_C*.so`` against the
installed torch. A plain ``pip install .`` (build isolation, no torch at build time)
ships the sources in ``msd_kernels/_csrc``; they are compiled here on first import with
``torch.utils.cpp_extension.load`` (ninja) into a cache folder keyed by the torch and
CUDA versions, and reused afterwards. ``MSD_KERNELS_JIT=1`` forces the build from
sources even where an ahead-of-time library exists (for kernel development).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from msd_kernels import _sources

_PACKAGE_DIR = Path(__file__).resolve().parent
_loaded_from: str | None = None


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _cache_dir(csrc: Path, with_cuda: bool) -> Path:
    flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"torch{torch.__version__}-{flavour}-py{sys.version_info.major}{sys.version_info.minor}"
    checkout = hashlib.sha1(str(csrc).encode()).hexdigest()[:10]
    root = os.environ.get("MSD_KERNELS_CACHE_DIR") or Path.home() / ".cache" / "msd_kernels"
    return Path(root) / f"{tag}-{checkout}"


def _build_from_sources() -> str:
    from torch.utils import cpp_extension

    csrc = _sources.find_csrc(_PACKAGE_DIR)
    with_cuda = _with_cuda()
    build_dir = _cache_dir(csrc, with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _sources.cuda_arch_list())
    print(
        f"msd_kernels: compiling the {'CPU+CUDA' if with_cuda else 'CPU'} kernels into "
        f"{build_dir} (first import only; ninja skips this when nothing changed)",
        file=sys.stderr,
        flush=True,
    )
    cpp_extension.load(
        name="msd_kernels_C",
        sources=_sources.extension_sources(csrc, with_cuda),
        extra_include_paths=_sources.include_dirs(csrc),
        extra_cflags=_sources.CXX_FLAGS,
        extra_cuda_cflags=_sources.NVCC_FLAGS,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("MSD_KERNELS_VERBOSE_BUILD") == "1",
    )
    return str(build_dir)


def load_library() -> str:
    """Register the ``torch.ops.msd`` ops; returns where they were loaded from."""
    global _loaded_from
    if _loaded_from is not None:
        return _loaded_from
    prebuilt = sorted(_PACKAGE_DIR.glob("_C*.so")) + sorted(_PACKAGE_DIR.glob("_C*.pyd"))
    if prebuilt and os.environ.get("MSD_KERNELS_JIT") != "1":
        torch.ops.load_library(str(prebuilt[0]))
        _loaded_from = str(prebuilt[0])
    else:
        _loaded_from = _build_from_sources()
    from msd_kernels import _fake  # noqa: F401  (needs the schemas registered first)

    return _loaded_from
