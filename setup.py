"""megatron_tip: on-policy distillation with token importance selection (TIP) on megatron-core."""
from setuptools import find_packages, setup

# Ranges admit the GPU-cluster stack too; requirements/cpu.txt pins this machine's exact CPU stack
# (a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box).
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core>=0.16.1",
    "transformers>=4.51,<5.20",  # 4.x and 5.x both tested (CI runs the config tests under both); vLLM 0.32 needs 5.16.1-5.19
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "pyyaml>=6",
    "psutil>=5.9",
    "tqdm>=4.66",
    "rich>=13",
    "math-verify>=0.7",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5"],
    "data": ["pyarrow>=14"],  # python -m megatron_tip.data.prepare on the published .parquet files
    # GPU clusters. 0.32 is the release whose CPU build the -m vllm tests pass with (same API);
    # it pins torch==2.13.0 and transformers>=5.16.1,<5.20. CPU: requirements/cpu-vllm.txt (README).
    "vllm": ["vllm>=0.32,<0.33"],
    "te": ["transformer-engine[pytorch]>=2.0"],
    # tools/bench_vs_trl.py only (TRL's GKDTrainer as the peer); 1.16 is the release it was measured with
    "bench": ["trl>=1.16,<1.17"],
}

setup(
    name="megatron_tip",
    version="0.1.0",
    description="Megatron-core on-policy knowledge distillation with token importance selection (TIP)",
    packages=find_packages(include=["megatron_tip", "megatron_tip.*"]),
    package_data={"megatron_tip": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-tip-train=megatron_tip.train:main"]},
)
