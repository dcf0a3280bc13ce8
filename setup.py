"""nanohuatuo: HuatuoGPT-style medical LLM alignment (SFT, RL from AI feedback, reward model, PPO) in PyTorch.

Run-time dependencies and why each is here:
- torch: the model, training and generation.
- safetensors: reading and writing Hugging Face weight files.
- sentencepiece, tokenizers: reading tokenizer.model and tokenizer.json (the two formats base models ship).
- numpy: small numeric helpers.
- openai: the client for any OpenAI-compatible endpoint used as the AI-feedback judge.
- matplotlib: the PNG curves every long job writes; writing plots by hand would be worse code.
Test-only: transformers, peft (and protobuf, which transformers needs to read a bare tokenizer.model)
are the reference implementations the tests compare against; they are never imported at run time.
"""

from setuptools import find_packages, setup

setup(
    name="nanohuatuo",
    version="0.1.0",
    description=__doc__.splitlines()[0],
    packages=find_packages(include=["nanohuatuo", "nanohuatuo.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.4", "safetensors", "sentencepiece", "tokenizers", "numpy", "openai", "matplotlib"],
    extras_require={"test": ["pytest", "transformers", "peft", "protobuf"]},
)
