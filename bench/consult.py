"""The multi-turn evaluation's consultations with one of our models: each conversation's keys kept
in the engine between its turns, against a new engine for every turn (as before).

evaluate.py dialogue has the candidate answer every open consultation's next turn; the turn's
prompt is the whole consultation so far, so a new engine per turn prefilled all of it again, and
a late turn's prefill cost about what its answer's decoding did. Now (consult.consult) our model
takes batch_size consultations at a time through all their turns in one engine with
keep_prefixes (answers.LocalModel), and a turn prefills only what the conversation added: the
patient's words and the answer's retokenised tail.

Both runs consult the same cases with `--patient offline` (the stand-in that recites the case;
no network), greedy, the same checkpoint, one after the other in this process, after a short
warm-up that pays the CPU kernels' timing. Per run: the
seconds spent answering (the model's load left out), the tokens that went through prefill
forwards (padding included) and the answers generated; and how many transcripts came out
identical (kept keys come from other forwards than a fresh prefill's, whose rounding can flip a
near-tie).

    python bench/consult.py --model DIR --data ../shared/data/huatuo_eval/Med-dialog_100.json --cases 16
    python bench/consult.py --model DIR --cases 8 --turns 5 --max-new-tokens 128 --batch-size 8
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
from nanohuatuo.evalsets import load_cases  # noqa: E402
from nanohuatuo.evaluate import DialogueConfig  # noqa: E402
from nanohuatuo.metrics import cpu_name  # noqa: E402


def run(cand, settings, cases, cfg, keep: bool) -> dict:
    """Consult every case with the engine keeping conversations (keep) or a new engine per turn."""
    made, prefilled, real_forward = [], [], engine_mod.forward

    def opening(c, s, run_cfg, keep_prefixes):
        made.append(answers.open_candidate(c, s, run_cfg, keep_prefixes=keep))
        return made[-1]

    def counting(model, ids, *a):
        prefilled.append(ids.numel())
        return real_forward(model, ids, *a)

    consult.open_candidate, engine_mod.forward = opening, counting
    t0 = time.time()
    try:
        got = consult.consult(cand, settings, cases, consult.OfflinePatient(), cfg, [])
    finally:
        consult.open_candidate, engine_mod.forward = answers.open_candidate, real_forward
    model = made[0]
    return {"keep_prefixes": keep, "answer_seconds": round(model.seconds, 2),
            "wall_seconds": round(time.time() - t0, 2),
            "prefill_tokens": sum(prefilled), "prefill_forwards": len(prefilled),
            "generated_tokens": model.generated_tokens, "transcripts": [g["transcript"] if g else None for g in got]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--data", default="data/eval_dialogues.json", help="cases in the Med-dialog format")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5,
                    help="doctor turns per consultation (every one run: --stop-rule turns)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="", help="write the figures (and transcripts) here as JSON")
    args = ap.parse_args()
    cases = load_cases(args.data)[:args.cases]
    cand = answers.Candidate(model=args.model, name="bench")
    settings = answers.GenerationSettings(max_new_tokens=args.max_new_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # a warm-up: the CPU kernels are timed once per process (cpu_kernels.tune_cpu_kernels), not in the first run
        run(cand, answers.GenerationSettings(max_new_tokens=4), cases[:1],
            DialogueConfig(answers_dir=os.path.join(tmp, "warm-up"), max_turns=1, batch_size=args.batch_size,
                           device="cpu", dtype=args.dtype), False)
        for keep in (False, True):  # each run in its own answer directory: nothing is reused
            cfg = DialogueConfig(answers_dir=os.path.join(tmp, str(keep)), max_turns=args.turns, stop_rule="turns",
                                 batch_size=args.batch_size, device="cpu", dtype=args.dtype)
            rows.append(run(cand, settings, cases, cfg, keep))
    before, after = rows
    same = sum(a == b for a, b in zip(before["transcripts"], after["transcripts"]))
    print(f"\n{len(cases)} consultations x {args.turns} turns, at most {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {args.dtype}, {cpu_name()}, torch threads {__import__('torch').get_num_threads()}")
    print("| engine | answering s | prefill tokens | prefill forwards | tokens generated | tok/s |")
    print("|---|---|---|---|---|---|")
    for r, name in ((before, "new engine per turn (before)"), (after, "conversations' keys kept")):
        print(f"| {name} | {r['answer_seconds']:.1f} | {r['prefill_tokens']:,} | {r['prefill_forwards']} | "
              f"{r['generated_tokens']:,} | {r['generated_tokens'] / r['answer_seconds']:.1f} |")
    print(f"speed-up {before['answer_seconds'] / after['answer_seconds']:.2f}x; "
          f"identical transcripts {same}/{len(cases)}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "cpu": cpu_name(), "same_transcripts": same, "runs": rows}, f,
                      ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
