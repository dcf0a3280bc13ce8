"""Time to the first token on CPU: a prompt's prefill (and the choice of one token) in the engine
against transformers, for each weight format, at several prompt lengths.

A chat's first answer waits for its whole prompt (system message, earlier turns, the question) to
go through the model. Unlike a decode step, which reads every weight for one row, a prefill
multiplies many rows at once and is bound by arithmetic: the kernels that read the weight fastest
are not the ones that multiply fastest. For int8 weights the engine times a kernel of its own for
many rows (cpu_int8.measure_rows: the weight converted to bfloat16 for one product, where the
processor has bfloat16 instructions); the row "int8, decode kernels" runs the same model with that
choice switched off (every row through the decode step's kernel, as before it existed), its timings
alternated with the int8 row's in the same process.

Each row: one Engine with one slot (as chat runs), `generate` of one new token (greedy) for a random
prompt of T tokens, best of `--repeats` after a warm-up; transformers: one forward of the prompt
that keeps the last position's logits (`logits_to_keep=1`) and takes its argmax, in the format's
dtype (float32 for int8: transformers has no CPU int8 kernel of its own). Same weights (bench/
generate.py's Qwen2-shaped random model, or `--model DIR`), same threads.

With `--model DIR --turns N`, a second table: a conversation of N turns (the first N questions of
data/eval_questions.json, each answered greedily with at most `--answer-tokens` tokens, in the
checkpoint's chat template, earlier turns kept as chat keeps them), the time to each turn's first
token in chat's session engine (chat.chat_engine: the conversation's keys kept between turns,
so a turn prefills only what it adds) against a new engine per turn (as chat ran before): the
first weight format of `--weights`, the two conversations one after the other.

    python bench/prefill.py --size 500M --lengths 32 128 512 --weights float32 bfloat16 int8
    python bench/prefill.py --model DIR --lengths 128 512 1024
    python bench/prefill.py --model DIR --lengths --weights int8 --turns 6
    python bench/prefill.py --size tiny --lengths 8 40 --repeats 1      # plumbing, seconds
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import SIZES, build, load_format, time_it  # noqa: E402  (bench/generate.py: the same model)
from nanohuatuo.cpu_kernels import int8_layers  # noqa: E402  (the layers tune_cpu_kernels measured)
from nanohuatuo.engine import Engine, SamplingParams  # noqa: E402
from nanohuatuo.metrics import cpu_name  # noqa: E402


def first_token(engine, prompt):
    return engine.generate([prompt], SamplingParams(max_new_tokens=1))[0].tokens[0]


def conversation(model, tok, template, questions, answer_tokens, engine=None, context=4096):
    """(seconds to each turn's first token, the answers) of a greedy chat over `questions`, each
    turn's prompt the conversation so far fitted as chat fits it, in `engine` (chat's session
    engine) or in a new engine per turn. The steps of chat.reply without its streamed text, which
    holds back as many characters as a stop string has, so its first text comes some tokens late."""
    from nanohuatuo.generate import cut_at_stop, stream
    from nanohuatuo.templates import fit_prompt, prompt_budget, stop_strings, stop_token_ids
    budget = prompt_budget(model.config.max_seq_len, context, answer_tokens)
    messages, waits, answers = [], [], []
    for q in questions:
        messages.append({"role": "user", "content": q})
        ids = fit_prompt(messages, tok, template, budget)
        t = time.perf_counter()
        tokens = stream(model, ids, answer_tokens, stop_ids=stop_token_ids(tok, template), engine=engine)
        first = [next(tokens)]
        waits.append(time.perf_counter() - t)
        answer = cut_at_stop(tok.decode(first + list(tokens)), stop_strings(template)).rstrip()
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer})
    return waits, answers


def hf_first_token(hf, prompt):
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="500M", choices=list(SIZES), help="model shape (default: 500M)")
    ap.add_argument("--model", default="", help="a checkpoint directory instead of random weights")
    ap.add_argument("--lengths", type=int, nargs="*", default=[32, 128, 512], help="prompt lengths (tokens)")
    ap.add_argument("--weights", nargs="+", default=["float32", "bfloat16", "int8"],
                    choices=["float32", "bfloat16", "int8"], help="weight formats (int8: on the float32 model)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row, the best kept (default: 3)")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--turns", type=int, default=0, help="with --model: a conversation of this many turns, "
                    "chat's session engine against a new engine per turn (default: 0, none)")
    ap.add_argument("--answer-tokens", type=int, default=64, help="most tokens of each --turns answer (default: 64)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nanohuatuo-bench"))
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args()
    args.dtype, args.device = "float32", "cpu"  # what load_format reads: int8 quantises the float32 model
    path = args.model or build(args.size, args.workdir, torch.float32)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = {T: torch.randint(0, vocab, (T,), generator=g).tolist() for T in args.lengths}
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.model or args.size}", flush=True)
    rows, hf_ms = [], {}
    if not args.no_hf and prompts:
        import transformers
        for fmt in sorted({"float32" if f == "int8" else f for f in args.weights}):
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, fmt)).eval()
            for T, p in prompts.items():
                ms = time_it(lambda: hf_first_token(hf, p), "cpu", args.repeats) * 1e3
                hf_ms[fmt, T] = (ms, hf_first_token(hf, p))
            del hf
    for fmt in args.weights if prompts else []:
        model = load_format(path, fmt, args)
        engine = Engine(model, slots=1, max_len=max(args.lengths) + 1)
        variants = {fmt: None}
        if fmt == "int8":  # the rows kernel on, and off (every row through the decode kernel): alternated
            layers = int8_layers(model)
            chosen = [m.rows_kernel for m in layers]
            print(f"int8 rows kernels chosen at load: {model.cpu_kernels.get('int8_rows')}", flush=True)
            variants = {"int8": chosen, "int8, decode kernels": [None] * len(layers)}
        for T, p in prompts.items():
            best, token = {}, {}
            for r in range(args.repeats + 1):  # round 0 warms up
                for name, kernels in variants.items():
                    if kernels is not None:
                        for m, k in zip(layers, kernels):
                            m.rows_kernel = k
                    t = time.perf_counter()
                    token[name] = first_token(engine, p)
                    if r:
                        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
            for name in variants:
                peer = hf_ms.get(("float32" if fmt == "int8" else fmt, T))
                row = {"weights": name, "prompt": T, "engine_ms": round(best[name] * 1e3, 1),
                       "transformers_ms": round(peer[0], 1) if peer else None,
                       "ratio": round(peer[0] / (best[name] * 1e3), 2) if peer else None,
                       "same_token": token[name] == peer[1] if peer else None}
                rows.append(row)
                print(row, flush=True)
            if fmt == "int8":
                for m, k in zip(layers, chosen):
                    m.rows_kernel = k
        del engine, model
    print("\n| weights | prompt tokens | engine ms | transformers ms | transformers / engine | same first token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['prompt']} | {r['engine_ms']} | {r['transformers_ms'] or '-'} | "
              f"{str(r['ratio']) + 'x' if r['ratio'] else '-'} | "
              f"{'-' if r['same_token'] is None else 'yes' if r['same_token'] else 'no'} |")
    turns = chat_turns(path, args) if args.turns and args.model else []
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": torch.get_num_threads(), "rows": rows, "turns": turns}, f,
                      indent=1)


def chat_turns(path, args):
    """The conversation table (`--turns`): one row per turn."""
    from nanohuatuo.chat import chat_engine
    from nanohuatuo.templates import render_prompt, tokenizer_and_template
    tok, template = tokenizer_and_template(path, None, "auto")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "data", "eval_questions.json"), encoding="utf-8") as f:
        questions = [q["query"] for q in json.load(f)][:args.turns]
    model = load_format(path, args.weights[0], args)
    conversation(model, tok, template, questions[:1], 4)  # warm-up: tuning, the first calls
    kept, kept_answers = conversation(model, tok, template, questions, args.answer_tokens, chat_engine(model, 4096))
    new, new_answers = conversation(model, tok, template, questions, args.answer_tokens)
    rows, messages = [], []
    print(f"\n{args.weights[0]}: a conversation of {len(questions)} turns, time to each turn's first token")
    print("| turn | prompt tokens | session engine ms | new engine per turn ms | new / session | same answer |")
    print("|---|---|---|---|---|---|")
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        row = {"turn": i + 1, "prompt": len(render_prompt(messages, tok, template)),
               "session_ms": round(kept[i] * 1e3, 1), "new_engine_ms": round(new[i] * 1e3, 1),
               "ratio": round(new[i] / kept[i], 2), "same_answer": kept_answers[i] == new_answers[i]}
        rows.append(row)
        messages.append({"role": "assistant", "content": kept_answers[i]})
        print(f"| {row['turn']} | {row['prompt']} | {row['session_ms']} | {row['new_engine_ms']} | {row['ratio']}x | "
              f"{'yes' if row['same_answer'] else 'no'} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
