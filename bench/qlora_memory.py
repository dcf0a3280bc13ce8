"""Estimate: GPU memory of the RLAIF stages (SFT, reward model, PPO) on a 7B base, bf16 / int8 / NF4.

Nothing is trained: the model is built on the meta device in each shape (Llama-2-7B, Qwen2.5-7B)
and the bytes are counted from its tensor sizes, LoRA attached as the stages attach it (r=16 on
every attention and MLP projection). Per stage:
- base: the block linears in the format asked (bf16 2 bytes a weight; int8 1 byte + a bf16 scale
  per row; NF4 half a byte + the double-quantised absmax, quant.py), everything else (embedding,
  lm_head, norms) in bf16. The reward model drops lm_head. PPO keeps ONE base: policy, reference
  (adapters off), value head and reward model (its adapter + head, reward_model.share_base) share it.
- LoRA: trainable adapters 16 bytes a parameter (fp32 weight, gradient, Adam's two moments);
  the frozen reward adapter in PPO 4 bytes.
- activations with gradient checkpointing: each block's input (bf16) is kept, one block at a time
  is recomputed in the backward with everything autograd saves in it (bf16 projections and MLP
  intermediates, the fp32 copies of the LoRA inputs), and one chunk of float32 logits (2^27
  values: losses.py) for the loss or the log-probs.
- dequantisation scratch (int8/NF4): the largest block weight dequantised for one matmul (the
  int32 codes, float32 values and the bf16 result at once).
- PPO: the larger of the rollout (the KV cache of the rollout batch) and the update (activations);
  "own RM": plus a second base without lm_head, for a reward model that cannot share (a released one).
int8 is inference-only in this project (chat/serve --int8); its rows show what it would save.
CUDA's context and the allocator's fragmentation (about 1 GB together) are not counted.

    python bench/qlora_memory.py                 # prints the markdown table of docs/benchmarks.md
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanohuatuo.lora import apply_lora, lora_parameters  # noqa: E402
from nanohuatuo.model import ModelConfig, Transformer  # noqa: E402
from nanohuatuo.quant import ABSMAX_BLOCK, BLOCK  # noqa: E402

SHAPES = {
    "Llama-2-7B": ModelConfig(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "Qwen2.5-7B": ModelConfig(arch="qwen2", vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                              ffn_dim=18944, qkv_bias=True),
}
GB = 1024**3
LOGIT_CHUNK = 2**27  # float32 logits of one chunk (losses.py)


def weight_bytes(numel: int, rows: int, fmt: str) -> float:
    if fmt == "bf16":
        return 2 * numel
    if fmt == "int8":
        return numel + 2 * rows
    n_blocks = -(-numel // BLOCK)
    return n_blocks * BLOCK / 2 + n_blocks + 4 * -(-n_blocks // ABSMAX_BLOCK) + 4  # codes, int8 absmax, scales, mean


def base_bytes(model, fmt: str, lm_head: bool) -> float:
    total = 0.0
    for name, p in model.named_parameters():
        if ".lora_" in name or (name.startswith("lm_head.") and not lm_head):
            continue
        block_weight = name.startswith("layers.") and p.ndim == 2
        total += weight_bytes(p.numel(), p.shape[0], fmt) if block_weight else 2 * p.numel()
    return total


def activation_bytes(c: ModelConfig, tokens: int, r: int) -> float:
    """Gradient checkpointing: the block inputs, one block's saved tensors, one logits chunk."""
    kv = c.n_kv_heads * c.head_dim
    kept = c.n_layers * tokens * c.dim * 2
    block_bf16 = tokens * (6 * c.dim + 2 * kv + 4 * c.ffn_dim) * 2  # norms, q k v, attention out, MLP
    lora_fp32 = tokens * (6 * c.dim + c.ffn_dim + 7 * r) * 4  # x.float() per adapted projection
    return kept + block_bf16 + lora_fp32 + LOGIT_CHUNK * 4


def scratch_bytes(c: ModelConfig, fmt: str) -> float:
    largest = max(c.dim * c.ffn_dim, c.dim * c.n_heads * c.head_dim)
    return 0.0 if fmt == "bf16" else largest * (4 + 4 + 2)


def kv_cache_bytes(c: ModelConfig, rows: int, length: int) -> float:
    return rows * length * c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2


def estimate(name: str, fmt: str, a) -> dict:
    c = SHAPES[name]
    with torch.device("meta"):
        model = Transformer(c)
    apply_lora(model, r=a.lora_r, alpha=2 * a.lora_r, dropout=0.0)
    lora = sum(p.numel() for p in lora_parameters(model))
    full, no_head = base_bytes(model, fmt, True), base_bytes(model, fmt, False)
    scratch = scratch_bytes(c, fmt)
    sft = full + 16 * lora + activation_bytes(c, a.sft_tokens, a.lora_r) + scratch
    rm = no_head + 16 * lora + activation_bytes(c, a.rm_tokens, a.lora_r) + scratch
    rollout = kv_cache_bytes(c, a.rollout_rows, a.ppo_len)
    update = activation_bytes(c, a.ppo_micro_rows * a.ppo_len, a.lora_r)
    ppo = full + 16 * lora + 4 * lora + max(rollout, update) + scratch
    own_rm = ppo + no_head  # a reward model that cannot share the base (a released one) loads its own copy
    return {"base": full, "lora": lora, "sft": sft, "rm": rm, "ppo": ppo, "rollout": rollout, "update": update,
            "own_rm": own_rm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every attention and MLP projection")
    p.add_argument("--sft-tokens", type=int, default=4 * 1024, help="tokens per SFT micro-batch (4 x 1024)")
    p.add_argument("--rm-tokens", type=int, default=8 * 512, help="tokens per reward-model micro-batch "
                                                                   "(4 prompts x 2 answers x 512)")
    p.add_argument("--rollout-rows", type=int, default=16, help="PPO rows generated at once")
    p.add_argument("--ppo-len", type=int, default=768, help="PPO prompt + answer tokens (512 + 256)")
    p.add_argument("--ppo-micro-rows", type=int, default=4, help="PPO rows per update forward/backward")
    a = p.parse_args(argv)
    print("| base | weights | base weights GB | LoRA params (M) | SFT GB | reward model GB | PPO GB "
          "(rollout KV / update activations) | PPO, own RM GB | fits 24 GB (shared RM / own RM) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SHAPES:
        for fmt in ("bf16", "int8", "nf4"):
            e = estimate(name, fmt, a)
            fits = ["yes" if max(e["sft"], e["rm"], ppo) + GB < 24 * GB else "no"  # + CUDA context, fragmentation
                    for ppo in (e["ppo"], e["own_rm"])]
            print(f"| {name} | {fmt} | {e['base'] / GB:.1f} | {e['lora'] / 1e6:.1f} | {e['sft'] / GB:.1f} | "
                  f"{e['rm'] / GB:.1f} | {e['ppo'] / GB:.1f} ({e['rollout'] / GB:.1f} / {e['update'] / GB:.1f}) | "
                  f"{e['own_rm'] / GB:.1f} | {' / '.join(fits)} |")


if __name__ == "__main__":
    main()
