"""nanohuatuo: HuatuoGPT-style medical LLM alignment (SFT, AI feedback, reward model, PPO) in PyTorch."""

from .model import ModelConfig, Transformer, KVCache
from .tokenizer import Tokenizer
from .generate import generate

__all__ = ["ModelConfig", "Transformer", "KVCache", "Tokenizer", "generate"]
