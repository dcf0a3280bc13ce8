"""Shared test helpers: tiny random-weight models saved in the Hugging Face layout (by `transformers`
or by our own Transformer), a sentencepiece or word-level tokenizer beside them, JSONL writing, and
one torch thread for every test.

Helpers are plain functions: `from conftest import tiny_base, write_jsonl, word_tokenizer`.
"""

import json
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

# small enough to be fast, odd enough to catch shape mix-ups (GQA, head_dim != dim / heads)
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # a 32-wide model gains nothing from threads, and on a shared 2-core machine spinning threads cost 5x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path, rows) -> str:
    """Rows as UTF-8 JSON lines (Chinese unescaped); returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


class TinyBase(NamedTuple):
    dir: str
    tok: object     # nanohuatuo.tokenizer.Tokenizer
    model: object   # nanohuatuo.model.Transformer


def tiny_base(path, texts, *, vocab_size=320, extra_tokens=(), seed=0, **model_kw) -> TinyBase:
    """A sentencepiece tokenizer trained on `texts` and a random tiny Llama (dim 32, 2 layers), saved
    together in `path` in the Hugging Face layout. `model_kw` overrides ModelConfig fields
    (n_kv_heads, ffn_dim, max_seq_len, value_head, lm_head, ...)."""
    from nanohuatuo.model import ModelConfig, Transformer
    from nanohuatuo.tokenizer import train_sentencepiece
    tok = train_sentencepiece(texts, path, vocab_size=vocab_size, extra_tokens=extra_tokens)
    kw = dict(arch="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
    kw.update(model_kw)
    model = Transformer(ModelConfig(**kw))
    model.init_weights(seed=seed)
    model.save_pretrained(path)
    return TinyBase(str(path), tok, model)


SPECIAL_WORDS = ("<unk>", "<s>", "</s>", "<pad>")


def word_tokenizer(d, words, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>"):
    """A word-level tokenizer.json in `d`: id i is words[i], split on whitespace; the first four
    are usually SPECIAL_WORDS. Exact and tiny: a test can write answers as ids."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    tk = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([t for t in (unk, bos, eos, pad) if t])
    tk.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
                   "add_bos_token": False}, f)


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
    elif kind in ("qwen2_window", "qwen3_window"):  # a window on every layer: from layer 0 on
        cls = tf.Qwen2Config if kind == "qwen2_window" else tf.Qwen3Config
        cfg = cls(**TINY, use_sliding_window=True, sliding_window=5, max_window_layers=0)
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


def bench_module(name: str):
    """bench/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun_ranks_agree(script, out):
    """Run `script` on two CPU processes under torchrun; each saves its trained parameters to
    out/rank{RANK}.pt. Asserts the run succeeded, both ranks ended with the same non-zero
    parameters and the metrics log has its two steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert torch.equal(a, b) and a.abs().sum() > 0  # the same update on both ranks from different rollouts
    assert len(open(out / "out" / "metrics.jsonl").readlines()) == 2
