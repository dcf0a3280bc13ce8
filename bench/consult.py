"""The evaluation's answers from one of our models: finished answers' keys kept in the engine (a
consultation's previous turns, a question's system prompt), against engines that keep nothing (as
before).

evaluate.py dialogue has the candidate answer every open consultation's next turn; the turn's
prompt is the whole consultation so far, so a new engine per turn prefilled all of it again, and
a late turn's prefill cost about what its answer's decoding did. Now (consult.consult) our model
takes batch_size consultations at a time through all their turns in one engine with
keep_prefixes (answers.LocalModel), and a turn prefills only what the conversation added: the
patient's words and the answer's retokenised tail. With `--questions FILE` (KUAKE-QIC) the
single-turn answers of evaluate.py pairwise and metrics instead (answers.get_answers): every
prompt begins with the template's system prompt, so a question admitted to a row another answer
freed prefills only what follows it.

Both runs answer the same cases (consultations with `--patient offline`, the stand-in that
recites the case; no network), greedy, the same checkpoint, one after the other in this process,
after a short warm-up that pays the CPU kernels' timing. Per run: the seconds spent answering
(the model's load left out), the tokens that went through prefill forwards (padding included)
and the answers generated; and how many transcripts (answers) came out identical (kept keys come
from other forwards than a fresh prefill's, whose rounding can flip a near-tie).

    python bench/consult.py --model DIR --data ../shared/data/huatuo_eval/Med-dialog_100.json --cases 16
    python bench/consult.py --model DIR --cases 8 --turns 5 --max-new-tokens 128 --batch-size 8
    python bench/consult.py --model DIR --questions ../shared/data/huatuo_eval/KUAKE-QIC_100.json --cases 48 \
        --max-new-tokens 64 --batch-size 16
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanohuatuo.engine as engine_mod  # noqa: E402
from nanohuatuo import answers, consult  # noqa: E402
from nanohuatuo.evalsets import load_cases, load_questions  # noqa: E402
from nanohuatuo.evaluate import DialogueConfig, PairwiseConfig  # noqa: E402
from nanohuatuo.metrics import cpu_name  # noqa: E402


def run(cand, settings, cases, cfg, keep: bool, questions: bool = False) -> dict:
    """Consult every case (or answer every question) with the engine keeping finished answers' keys
    (keep) or not (a new engine per turn; per batch of questions)."""
    made, prefilled, real_open, real_forward = [], [], answers.open_candidate, engine_mod.forward

    def opening(c, s, run_cfg):
        made.append(real_open(c, s, run_cfg))
        made[-1].keep_prefixes = keep  # False: a new engine per batch that keeps nothing, as before
        return made[-1]

    def counting(model, ids, *a):
        prefilled.append(ids.numel())
        return real_forward(model, ids, *a)

    consult.open_candidate = answers.open_candidate = opening
    engine_mod.forward = counting
    t0 = time.time()
    try:
        if questions:
            got = answers.get_answers(cand, settings, cases, cfg, [])
        else:
            got = [g["transcript"] if g else None
                   for g in consult.consult(cand, settings, cases, consult.OfflinePatient(), cfg, [])]
    finally:
        consult.open_candidate = answers.open_candidate = real_open
        engine_mod.forward = real_forward
    model = made[0]
    return {"keep_prefixes": keep, "answer_seconds": round(model.seconds, 2),
            "wall_seconds": round(time.time() - t0, 2),
            "prefill_tokens": sum(prefilled), "prefill_forwards": len(prefilled),
            "cached_tokens": model.cached_tokens, "prompt_tokens": model.prompt_tokens,
            "generated_tokens": model.generated_tokens, "transcripts": got}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--data", default="data/eval_dialogues.json", help="cases in the Med-dialog format")
    ap.add_argument("--questions", default="", help="KUAKE-QIC questions: single-turn answers instead of consultations")
    ap.add_argument("--cases", type=int, default=8, help="consultations (questions) to run")
    ap.add_argument("--turns", type=int, default=5,
                    help="doctor turns per consultation (every one run: --stop-rule turns)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="", help="write the figures (and transcripts) here as JSON")
    args = ap.parse_args()
    questions = bool(args.questions)
    if questions:
        cases = [{"id": q["id"], "messages": [{"role": "user", "content": q["query"]}]}
                 for q in load_questions(args.questions, args.cases)]
    else:
        cases = load_cases(args.data)[:args.cases]
    cand = answers.Candidate(model=args.model, name="bench")
    settings = answers.GenerationSettings(max_new_tokens=args.max_new_tokens)

    def config(where, turns):  # the run's own answer directory: nothing is reused from another run
        if questions:
            return PairwiseConfig(answers_dir=where, batch_size=args.batch_size, device="cpu", dtype=args.dtype)
        return DialogueConfig(answers_dir=where, max_turns=turns, stop_rule="turns", batch_size=args.batch_size,
                              device="cpu", dtype=args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # a warm-up: the CPU kernels are timed once per process (cpu_kernels.tune_cpu_kernels), not in the first run
        run(cand, answers.GenerationSettings(max_new_tokens=4), cases[:1], config(os.path.join(tmp, "warm-up"), 1),
            False, questions)
        for keep in (False, True):
            rows.append(run(cand, settings, cases, config(os.path.join(tmp, str(keep)), args.turns), keep, questions))
    before, after = rows
    same = sum(a == b for a, b in zip(before["transcripts"], after["transcripts"]))
    what = "questions" if questions else f"consultations x {args.turns} turns"
    print(f"\n{len(cases)} {what}, at most {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"{args.dtype}, {cpu_name()}, torch threads {__import__('torch').get_num_threads()}")
    print("| engine | answering s | prefill tokens | prefill forwards | prompt tokens from kept keys | "
          "tokens generated | tok/s |")
    print("|---|---|---|---|---|---|---|")
    names = ("new engine per batch (before)", "answers' keys kept") if questions else \
        ("new engine per turn (before)", "conversations' keys kept")
    for r, name in zip((before, after), names):
        print(f"| {name} | {r['answer_seconds']:.1f} | {r['prefill_tokens']:,} | {r['prefill_forwards']} | "
              f"{r['cached_tokens']:,} of {r['prompt_tokens']:,} | "
              f"{r['generated_tokens']:,} | {r['generated_tokens'] / r['answer_seconds']:.1f} |")
    print(f"speed-up {before['answer_seconds'] / after['answer_seconds']:.2f}x; "
          f"identical {'answers' if questions else 'transcripts'} {same}/{len(cases)}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "cpu": cpu_name(), "same_transcripts": same, "runs": rows}, f,
                      ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
