"""Shared test helpers: tiny random-weight models saved in the Hugging Face layout by `transformers`."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# small enough to be fast, odd enough to catch shape mix-ups (GQA, head_dim != dim / heads)
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def hf_tiny(kind: str, seed: int = 0):
    """A tiny `transformers` causal LM of one family with random weights, in eval mode."""
    import transformers as tf
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(**TINY, rope_theta=10000.0)
    elif kind == "llama3":
        cfg = tf.LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))
    elif kind == "mistral":
        cfg = tf.MistralConfig(**TINY, sliding_window=None)
    elif kind == "mistral_window":
        cfg = tf.MistralConfig(**TINY, sliding_window=5)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**TINY, tie_word_embeddings=True)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=False)
    elif kind == "bloom":
        cfg = tf.BloomConfig(vocab_size=101, hidden_size=32, n_layer=2, n_head=4)
    else:
        raise ValueError(kind)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random (not zero) biases and norm gains so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Saved tiny models by family, built once per test session."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind)
            model = hf_tiny(kind)
            model.save_pretrained(path)
            cache[kind] = (str(path), model)
        return cache[kind]
    return get
