from pathlib import Path

from setuptools import find_packages, setup


def read_requirements() -> list:
    """Runtime requirements, without colossalai: it is installed with --no-deps (see scripts/setup_env.sh)."""
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
    name="colossal-llama",
    version="0.1.0",
    description="Cheap continual pre-training and fine-tuning of LLaMA-family models (Colossal-LLaMA recipe)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["colossal_llama", "colossal_llama.*"]),
    package_data={"colossal_llama": ["eval/web/*.html"]},
    python_requires=">=3.10",
    install_requires=read_requirements(),
    entry_points={
        "console_scripts": [
            "colossal-llama-init-tokenizer=colossal_llama.tokenizer.init_tokenizer:main",
            "colossal-llama-mine-pieces=colossal_llama.tokenizer.mine_pieces:main",
            "colossal-llama-init-model=colossal_llama.model.init_model:main",
            "colossal-llama-prepare-pretrain=colossal_llama.dataset.prepare:pretrain_main",
            "colossal-llama-prepare-sft=colossal_llama.dataset.prepare:sft_main",
            "colossal-llama-train=colossal_llama.training.cli:main",
            "colossal-llama-generate=colossal_llama.inference.cli:main",
            "colossal-llama-evaluate=colossal_llama.eval.cli:main",
            "colossal-llama-plot-losses=colossal_llama.utils.plot_losses:main",
            "colossal-llama-chat-web=colossal_llama.eval.web.server:main",
            "colossal-llama-export-gguf=colossal_llama.model.gguf_export:main",
            "colossal-llama-model-from-config=colossal_llama.model.from_config:main",
            "colossal-llama-fetch-model=colossal_llama.model.fetch:main",
            "colossal-llama-self-replay=colossal_llama.inference.self_replay:main",
        ]
    },
)
