"""Generation for chat, serving, evaluation and PPO rollouts: thin wrappers over `engine.Engine`.

    generate(model, prompts, max_new_tokens, temperature=0.0, ...) -> new tokens per prompt
    generate_batch(...)  -> Generation(tokens, logprobs, finished)   (PPO needs the log-probs)
    stream(model, prompt, ...) -> yields token ids one at a time      (chat)
    load_for_inference(model_dir, adapter, ...) -> (model, tokenizer, template), adapter merged, --quant applied
    for_inference(model)                       # a model that will only generate: cpu_kernels may pack it

Each call makes an Engine with one slot per prompt, so every prompt runs at once and a row that
finished early stops costing compute; identical prompts (K samples of one prompt) are prefilled
once. A prompt gets the tokens it gets alone (up to float rounding, which can flip a near-tie:
engine.py). Sampling draws from one generator per row: row i of a call seeded with `seed` uses
`engine.sample_seed(seed, i)`, so its tokens depend on the seed and its index, not on the other
rows.
"""

from dataclasses import dataclass

import torch

from .cpu_kernels import head_logits, tune_cpu_kernels
from .heap import keep_large_blocks
from .engine import Engine
from .token_sampling import SamplingParams, process_logits, sample, sample_seed
from .hf import check_model_dir
from .lora import merge_and_unload, read_adapter_config
from .model import Transformer
from .quant import INFERENCE_QUANTS, quantize, quantize_int8
from .templates import tokenizer_and_template

__all__ = ["Generation", "generate", "generate_batch", "stream", "cut_at_stop", "left_pad", "process_logits",
           "sample", "head_logits", "use_column_major_weights", "load_for_inference", "inference_quant"]


def load_for_inference(model_dir, adapter=None, dtype=None, device="cpu", quant="none", template="auto",
                       what="generation"):
    """(model, tokenizer, template) ready to generate: what chat, serve, sampling and evaluation load.

    Everything cheap is checked before the weights are read: config.json, every tensor's name and
    shape in the weight files' headers, the adapter's config, the tokenizer and the chat template
    (template "auto": the model's own; a trained adapter's own tokenizer and template win, see
    templates.tokenizer_and_template). The adapter is merged, so generating costs what the base
    model does. `quant` (quant.INFERENCE_QUANTS): "int8" or "nf4" load on the CPU, merge and
    quantise there, so the full-precision copy never sits on the GPU (a 7B model then needs about
    7.5 GB in int8). The model is marked `inference_only` (its parameters need no gradients): on
    a CPU `cpu_kernels.tune_cpu_kernels` may then store float32 weights (and, with bfloat16
    instructions, bfloat16 ones) in oneDNN's own layout, which only generation can read (no
    training, no saving). On a CPU the process's allocator then keeps freed blocks for reuse
    (`heap.keep_large_blocks`).
    """
    if quant not in INFERENCE_QUANTS:
        raise ValueError(f"--quant {quant}: use one of {', '.join(INFERENCE_QUANTS)}")
    if not check_model_dir(model_dir, build=Transformer).lm_head:
        raise ValueError(f"{model_dir} is a reward model (a value head, no lm_head): {what} needs a language model")
    if adapter:
        read_adapter_config(adapter)
    tok, template = tokenizer_and_template(model_dir, adapter or None, template or "auto")
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device="cpu" if quant != "none" else device,
                                        adapter=adapter or None)
    if adapter:
        merge_and_unload(model)
    if quant != "none":
        quantize_int8(model) if quant == "int8" else quantize(model, quant)
        model.to(device)
    if torch.device(device).type == "cpu":
        keep_large_blocks()  # every step's temporaries reuse the last step's memory (no fresh pages)
    return for_inference(model), tok, template


def for_inference(model: Transformer) -> Transformer:
    """Mark a model that will only generate and score: no gradients, eval mode, and `inference_only`,
    so the CPU kernels may keep its weights in oneDNN's packed layout (cpu_kernels: faster,
    but then it cannot train or be saved)."""
    model.requires_grad_(False)
    model.inference_only = True
    return model.eval()


def inference_quant(quant: str, int8: bool = False) -> str:
    """The --quant of chat and serve, with the earlier --int8 (hidden; cli.py warns) meaning --quant int8."""
    if int8 and quant not in ("none", "int8"):
        raise ValueError(f"--int8 is the earlier spelling of --quant int8, which --quant {quant} contradicts; "
                         f"pass --quant alone")
    return "int8" if int8 else quant


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the stop token/string
    logprobs: list[list[float]] | None  # log-prob of each sampled token under logits / temperature
    finished: list[bool]  # True if it stopped on a stop token or string, False if it hit the length limit


def left_pad(prompts, pad_id, device):
    """(B, P) ids left-padded with pad_id and the (B, P) mask of real tokens."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def use_column_major_weights(model, compiled=False):
    """Lay out the CPU weights as this machine reads them fastest (`cpu_kernels.tune_cpu_kernels`;
    `compiled`: for an engine that compiles its decode step).

    Training code calls this once before its first generation, outside inference mode, so that
    generation later finds the layout done."""
    tune_cpu_kernels(model, compiled=compiled)


def _check(prompts):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a BOS token or some text)")


def _engine(model, prompts, max_new_tokens, tokenizer, compile):
    max_len = max(len(p) for p in prompts) + max_new_tokens
    if compile:
        max_len = -(-max_len // 256) * 256  # few distinct cache shapes, so few compilations and CUDA graphs
    return Engine(model, tokenizer=tokenizer, slots=len(prompts), max_len=max_len, compile=compile)


def _row_seeds(seed, temperature, n):
    if temperature <= 0:
        return [None] * n
    if seed is None:
        seed = int(torch.randint(2**62, ()))  # torch.manual_seed makes it repeatable
    return [sample_seed(seed, i) for i in range(n)]


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                   stop_ids=(), stop_strings=(), tokenizer=None, pad_id: int = 0, compile: bool = False,
                   return_logprobs: bool = False) -> Generation:
    """Generate for a batch of token-id prompts; rows stop on a stop id or stop string.

    Stop strings need the tokenizer; a row stops at the token that completes one (that token is
    kept; `cut_at_stop` trims the text). Log-probs are taken from logits / temperature before
    top-k/top-p, which is what PPO's importance ratios need under pure sampling. pad_id is unused
    (no padding any more) and kept for callers.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    _check(prompts)
    if max_new_tokens <= 0:
        return Generation([[] for _ in prompts], [[] for _ in prompts] if return_logprobs else None,
                          [False] * len(prompts))
    eng = _engine(model, prompts, max_new_tokens, tokenizer, compile)
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, stop_ids=tuple(stop_ids),
                             stop_strings=tuple(stop_strings), seed=s, logprobs=return_logprobs)
              for s in _row_seeds(seed, temperature, len(prompts))]
    outs = eng.generate(prompts, params)
    return Generation([o.tokens for o in outs], [o.logprobs for o in outs] if return_logprobs else None,
                      [o.finish_reason == "stop" for o in outs])


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             **kw) -> list[list[int]]:
    """New tokens for each prompt (greedy by default). See generate_batch for the options."""
    return generate_batch(model, prompts, max_new_tokens, temperature=temperature, **kw).tokens


@torch.inference_mode()
def stream(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
           stop_ids=(), top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           seed: int | None = None, pad_id: int = 0, compile: bool = False, engine: Engine | None = None):
    """Yield new token ids one at a time for one prompt, stopping after a stop id.

    engine: an Engine of `model` to run it in (chat keeps one across turns, with keep_prefixes), else
    a new one. Closing the generator early (a stop string, Ctrl-C) cancels the request there."""
    _check([prompt])
    if max_new_tokens <= 0:
        return
    eng = engine or _engine(model, [prompt], max_new_tokens, None, compile)
    rid = eng.add(prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         top_k=top_k, repetition_penalty=repetition_penalty, stop_ids=tuple(stop_ids),
                                         seed=_row_seeds(seed, temperature, 1)[0]))
    done = False
    try:
        while not done:
            for ev in eng.step():
                if ev.rid == rid:
                    done = ev.finish_reason is not None
                    yield ev.token
    finally:
        if not done:  # its row is freed at the engine's next step
            eng.cancel(rid)


def cut_at_stop(text: str, stop_strings) -> str:
    """The text before the first stop string (the whole text if none occurs)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
