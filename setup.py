"""Build and install wsss.

The Python package installs everywhere. The C++/CUDA extension ``wsss._C`` (dense CRF and the
regularized loss, ``csrc/``) is built from ``csrc/cpu/*.cpp`` and ``csrc/*.cpp`` always, and
from ``csrc/cuda/*.cu`` whenever a CUDA toolkit and a CUDA-enabled torch are present.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against
the torch already in the environment (build isolation would download a second torch).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _default_cuda_home():
    # torch infers CUDA_HOME from `which nvcc`; on machines where nvcc is a symlink outside
    # the toolkit that yields /usr/local and linking fails with "cannot find -lcudart".
    if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extensions():
    if os.environ.get("WSSS_NO_EXTENSION") == "1":
        return [], {}
    sources_cpp = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if not sources_cpp:
        return [], {}
    _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    sources_cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    with_cuda = (
        bool(sources_cu)
        and cpp_extension.CUDA_HOME is not None
        and torch.version.cuda is not None
        and os.environ.get("WSSS_NO_CUDA") != "1"
    )
    # No -std flag: torch picks the standard its headers need (C++17 or C++20 by version).
    # -g0: Python's default CFLAGS carry -g, which only slows the build and bloats the library.
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    define_macros = []
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731
    if with_cuda:
        # Ampere and Hopper machine code, plus PTX of the highest listed architecture so that
        # newer GPUs JIT-compile it instead of failing with "no kernel image"; users override
        # with TORCH_CUDA_ARCH_LIST.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        define_macros.append(("WSSS_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "wsss._C",
            rel(sources_cpp + sources_cu),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "wsss._C", rel(sources_cpp), define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="wsss",
    version="0.1.0",
    description="Fast weakly supervised semantic segmentation: MoRe and AReAM with Triton and CUDA hot paths",
    packages=find_packages(include=["wsss", "wsss.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0.3",
        "numpy>=1.24",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": ["pytest>=7.0", "ninja", "scipy", "matplotlib", "pydensecrf2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
