"""Build of the msd package and its extension ``msd_kernels._C``.

- torch importable at build time (``pip install --no-build-isolation .``): the C++ CPU
  kernels, and the CUDA kernels where torch is a CUDA build and a CUDA toolkit is found,
  are compiled ahead of time (architectures from TORCH_CUDA_ARCH_LIST, default 8.0;9.0).
- torch not importable (plain ``pip install .`` with build isolation): a pure-Python
  wheel that carries the sources in ``msd_kernels/_csrc``; they are compiled on first
  import (see msd_kernels/_loader.py).
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_msd_sources", ROOT / "msd_kernels" / "_sources.py")
sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources)


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package, for the build-on-import path."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "msd_kernels" / "_csrc"
        shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True)


def torch_extension():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("msd: torch is not importable at build time; the kernels will compile on first import")
        return [], {}
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("MSD_KERNELS_NO_CUDA") != "1"
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", sources.cuda_arch_list())
    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    csrc = Path("csrc")
    extension = extension_class(
        name="msd_kernels._C",
        sources=sources.extension_sources(csrc, with_cuda),
        include_dirs=[str(ROOT / d) for d in sources.include_dirs(csrc)],
        extra_compile_args={"cxx": sources.CXX_FLAGS, "nvcc": sources.NVCC_FLAGS},
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True, no_python_abi_suffix=False)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = torch_extension()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
)
