"""mrlhf: Megatron-style 3D-parallel RLHF. The C++/CUDA ops in csrc/ are built into mrlhf._C when present."""

import glob
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def extensions():
    """mrlhf._C from csrc/*.cpp (and csrc/*.cu with a CUDA torch and toolkit); none while csrc/ is empty."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("MRLHF_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    args = {"cxx": ["-O3", "-std=c++17", "-fopenmp"]}
    if cuda_sources and torch.version.cuda and CUDA_HOME:
        args["nvcc"] = ["-O3", "-std=c++17", "-DMRLHF_WITH_CUDA"]
        args["cxx"].append("-DMRLHF_WITH_CUDA")
        ext = CUDAExtension("mrlhf._C", sources + cuda_sources, extra_compile_args=args)
    else:
        ext = CppExtension("mrlhf._C", sources, extra_compile_args=args, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="mrlhf",
    version="0.1.0",
    description="Megatron-style 3D-parallel RLHF toolkit (SFT, RM, PPO, DPO) on megatron-core",
    packages=find_packages(include=["mrlhf", "mrlhf.*"]),
    package_data={"mrlhf": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        # mrlhf/convert and the CPU compat patches use megatron-core's private APIs (dist_checkpointing strategies,
        # parallel_state internals): allow only the minor series they were tested with (0.16.1, Python 3.10-3.12).
        "megatron-core>=0.16,<0.17",
        "sentencepiece>=0.2",
        "numpy",
        "pybind11",
        "safetensors",
        "pyyaml",
        "psutil",
        "tqdm",
        "tokenizers>=0.20",
        "fastapi>=0.110",  # mrlhf serve: HTTP front end (OpenAI-compatible API)
        "uvicorn>=0.29",
        "prometheus-client>=0.20",
    ],
    entry_points={"console_scripts": ["mrlhf=mrlhf.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
