"""Sampling K answers per prompt from the SFT model: the candidates the AI judge ranks (RLAIF step 1).

    items = sample_answers(model, tok, template, prompts, k=4)   # prompts: data.to_prompt records
    python -m nanohuatuo.sampling --model SFT_DIR [--adapter DIR] --prompts PROMPTS.jsonl --k 4 \
        --out SAMPLES.jsonl [--max-new-tokens 256 --temperature 0.7 --top-p 1.0 --batch-size 8 \
         --seed 0 --context 2048 --template NAME --device cuda --dtype bfloat16 --limit N]

PROMPTS.jsonl holds prompt records `{"id", "messages" (ending with a user turn), "reference"}`
(`python -m nanohuatuo.data prompts`) or schema conversations, which are turned into prompt
records with `data.to_prompt` (the last assistant turn becomes the reference).

Each output line is a judge item for `python -m nanohuatuo.feedback rank`:
    {"id", "question": messages, "reference": the doctor's reply, "answers": [k sampled answers]}

Each prompt is repeated k times inside one batch, so its k answers differ only by the sampling
noise. Answers stop at the template's end token or stop strings and are cut before the stop string.
The output file is rewritten atomically every half minute and at the end; a rerun with the same
--out skips the ids already there, so an interrupted run resumes.
"""

import argparse
import os
import sys
import time

import torch

from .chat import load_for_chat, trim_history
from .data import DataError, iter_jsonl, to_prompt, write_jsonl
from .generate import cut_at_stop, generate_batch
from .templates import render_prompt, stop_strings, stop_token_ids

SAVE_EVERY_S = 30.0  # how often the CLI rewrites --out with what it has so far


def sample_answers(model, tok, template: str, prompts: list[dict], k: int = 4, max_new_tokens: int = 256,
                   temperature: float = 0.7, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                   context: int = 2048, on_batch=None) -> list[dict]:
    """Judge items with k sampled answers for each prompt record, in prompt order.

    batch_size counts sequences per generation call; it holds max(1, batch_size // k) prompts.
    Batch number b samples with seed + b, so a run is reproducible for a given batch_size.
    Prompts longer than context - max_new_tokens lose their oldest turns, then their oldest tokens.
    on_batch(new_items) is called after each batch (the CLI saves progress there).
    """
    if k < 1:
        raise ValueError(f"sample_answers: k={k}; need at least one answer per prompt (the judge needs 2+)")
    stops = stop_strings(template)
    stop_ids = stop_token_ids(tok, template)
    budget = max(context - max_new_tokens, 1)
    per_batch = max(1, batch_size // k)
    items, t0, n_tokens, n_cut, last_print = [], time.time(), 0, 0, 0.0
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        chunk = prompts[start:start + per_batch]
        ids = []
        for p in chunk:
            messages = trim_history(p["messages"], tok, template, budget)
            ids.append(render_prompt(messages, tok, template)[-budget:])
        batch = [prompt_ids for prompt_ids in ids for _ in range(k)]  # (len(chunk) * k) rows, k per prompt
        gen = generate_batch(model, batch, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + b,
                             stop_ids=stop_ids, stop_strings=stops, tokenizer=tok, pad_id=tok.pad_id)
        n_tokens += sum(len(t) for t in gen.tokens)
        n_cut += gen.finished.count(False)
        new = []
        for i, p in enumerate(chunk):
            rows = gen.tokens[i * k:(i + 1) * k]
            # decode skips the end token; a stop string the model wrote out is cut here
            answers = [cut_at_stop(tok.decode(t), stops).strip() for t in rows]
            new.append({"id": p["id"], "question": p["messages"], "reference": p["reference"], "answers": answers})
        items += new
        if on_batch is not None:
            on_batch(new)
        done, elapsed = start + len(chunk), time.time() - t0
        if elapsed - last_print >= 10 or done == len(prompts):
            last_print = elapsed
            eta = elapsed / done * (len(prompts) - done)
            # many answers cut at the length limit: raise max_new_tokens, or the judge ranks fragments
            print(f"sampling: {done}/{len(prompts)} prompts | {n_cut}/{done * k} answers hit max_new_tokens | "
                  f"{n_tokens / max(elapsed, 1e-9):.0f} tok/s | eta {eta / 60:.1f} min", flush=True)
    return items


def read_prompts(path) -> list[dict]:
    """Prompt records from a file of prompt records or of schema conversations (see module doc)."""
    prompts = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "reference" in row:
            if not isinstance(row.get("messages"), list) or not row["messages"] or "id" not in row:
                raise DataError(f"{where}: a prompt record needs 'id', 'messages' (ending with a user turn) "
                                f"and 'reference'; make it with `python -m nanohuatuo.data prompts`")
            prompts.append(row)
        elif isinstance(row.get("messages"), list):
            try:
                prompts.append(to_prompt(row))
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        else:
            raise DataError(f"{where}: expected a prompt record (with 'reference') or a conversation "
                            f"(with 'messages' ending in an assistant turn)")
        if prompts[-1]["messages"][-1].get("role") != "user":
            raise DataError(f"{where}: the prompt must end with a user turn to be answered")
    return prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanohuatuo.sampling",
                                 description="Sample K answers per prompt from the SFT model for the AI judge.")
    ap.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    ap.add_argument("--adapter", help="LoRA adapter directory (the SFT adapter), merged before sampling")
    ap.add_argument("--prompts", required=True, help="JSONL of prompt records or conversations")
    ap.add_argument("--out", required=True, help="JSONL of judge items to write")
    ap.add_argument("--k", type=int, default=4, help="answers per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per generation call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context", type=int, default=2048, help="prompt + answer token budget")
    ap.add_argument("--template", help="chat template (default: guessed from the model directory)")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on cuda, else fp32")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    args = ap.parse_args(argv)

    try:
        prompts = read_prompts(args.prompts)[:args.limit]
        done = [row for _, row in iter_jsonl(args.out)] if os.path.exists(args.out) else []
    except DataError as e:
        raise SystemExit(f"nanohuatuo/sampling.py: {e}") from None
    seen = {row["id"] for row in done}
    todo = [p for p in prompts if p["id"] not in seen]
    if done:
        print(f"sampling: {args.out} already has {len(done)} items; sampling the other {len(todo)} prompts")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok, template = load_for_chat(args.model, adapter=args.adapter, dtype=dtype, device=args.device,
                                         template=args.template)
    print(f"sampling: {len(todo)} prompts x {args.k} answers, template {template}, device "
          f"{model.embed_tokens.weight.device}", flush=True)
    last_save = [time.time()]

    def save(new):
        done.extend(new)
        if time.time() - last_save[0] > SAVE_EVERY_S:
            write_jsonl(args.out, done)
            last_save[0] = time.time()

    sample_answers(model, tok, template, todo, k=args.k, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                   context=args.context, on_batch=save)
    n = write_jsonl(args.out, done)
    print(f"sampling: wrote {n} items to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
