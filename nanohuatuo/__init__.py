"""nanohuatuo: HuatuoGPT-style medical LLM alignment (SFT, AI feedback, reward model, PPO) in PyTorch.

The public names below load on first use, so `import nanohuatuo` (and the commands that only call an
LLM endpoint: distill, feedback and evaluate with endpoints) start without importing torch.
"""

import importlib

from . import heap

heap.huge_pages_for_large_tensors()  # before any module of the package makes a tensor: torch reads it then

_HOMES = {"ModelConfig": "model", "Transformer": "model", "Tokenizer": "tokenizer",
          "generate": "generate"}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
