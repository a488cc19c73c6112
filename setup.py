"""Installs the ``umamba`` package: U-Mamba-Net separation recipes for SpeechBrain."""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="umamba",
    version="0.1.0",
    description="U-Mamba-Net (U-Net + Mamba) speech separation as a SpeechBrain recipe project",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["umamba", "umamba.*"]),
    install_requires=[
        "torch>=2.7.1",
        "torchaudio>=2.7.1",
        "speechbrain>=1.1.2",
        "hyperpyyaml>=1.2",
        "ruamel.yaml>=0.17",
        "PyYAML>=6.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "soundfile>=0.12",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10",
        "pesq>=0.0.4",
        "pystoi>=0.4",
        "fast-bss-eval>=0.1.4",
        "pyroomacoustics>=0.10",
        "pyloudnorm>=0.1",
        "numba>=0.60",
    ],
    extras_require={
        # Everything the test suite and the benchmarks use on top of the runtime set.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "mir-eval>=0.8", "mambapy>=1.2"],
        # CUDA kernels: the fast path on a GPU, never needed on CPU (imported lazily).
        # Build them against the installed torch: see README, "GPU".
        "gpu": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
    },
    entry_points={
        "console_scripts": [
            "umamba-separate=umamba.cli:main",
        ]
    },
)
