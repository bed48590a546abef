"""aflkd-runtime: MPI runtime for cloud-edge collaborative deep learning on small boards."""
from setuptools import find_packages, setup

setup(
    name="aflkd-runtime",
    version="0.1.0",
    description="Feature-map split inference over MPI and AFLKD edge distillation (PyTorch + mpi4py)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The design card's top-level layout: each folder is an importable package.
    packages=find_packages(include=["runtime", "models", "kd", "scheduling", "launch",
                                    "runtime.*", "models.*", "kd.*", "scheduling.*", "launch.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "mpi4py>=3.1",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "psutil>=5.9",
    ],
    extras_require={
        # MPI from PyPI (no system MPI needed); leave it out on boards with a system MPI.
        "mpich": ["mpich"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "hypothesis>=6", "pytest-xdist>=3.2"],
        # timm's CNN families for docs/timm.md (tests/timm_families.py, tests/test_timm_families.py);
        # never imported by the runtime.
        "zoo": ["timm"],
    },
    entry_points={"console_scripts": ["aflkd = launch.entry:run"]},
)
