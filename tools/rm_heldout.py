"""Did RL raise the reward model's score on prompts it never saw? A larger sampled check of a finished demo run.

The demo's report scores k sampled answers per held-out prompt for each RL policy and for SFT. On a
small model those differences are a few tenths of the reward model's spread, and the noise of a few
sampled answers per prompt is as large, so one check over 28 prompts can miss a real rise or show a
false one. This samples more: every single-turn question of data/eval_questions.json (none of them
is a PPO prompt), k answers each, for one or more seeds, with the run's own base, adapters, reward
model, template, answer length and PPO's temperature, and reports each policy's mean score minus
SFT's with a 95% bootstrap interval over questions (seeds pooled: each question's mean over them),
and each model's mean answer length.

    python tools/rm_heldout.py runs/smol_cpu --k 4 --seeds 0 1
    python tools/rm_heldout.py runs/smol_cpu --models PPO GRPO --questions 20
    python tools/rm_heldout.py runs/smol_cpu --models PPO PPO-k2=runs/ppo_k2   # another PPO on the same SFT

Writes RUN/eval/rm_heldout_sampled.json (or --out): per-question scores, per seed. A policy whose
adapter is not there (a run without GRPO, say) is skipped with a line saying so.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanohuatuo.demo import DATA, sampled_rm_scores  # noqa: E402
from nanohuatuo.reward_model import load_reward_model  # noqa: E402
from nanohuatuo.winrate import paired_diff  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished demo run's --out directory (demo_config.json, sft/, rm/, ppo/ ...)")
    p.add_argument("--models", nargs="+", default=["PPO", "GRPO", "DPO"],
                   help="policies compared with SFT: a name (its adapter in RUN/<name>) or NAME=ADAPTER_DIR (an "
                        "adapter on the run's base, e.g. from a train_ppo.py run with other flags)")
    p.add_argument("--base", action="store_true", help="also the base model without adapters")
    p.add_argument("--k", type=int, default=4, help="sampled answers per question and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds (each a full pass)")
    p.add_argument("--questions", type=int, default=0, help="the first N questions (0: all)")
    p.add_argument("--temperature", type=float, default=None, help="default: the run's PPO temperature")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON to write (default RUN/eval/rm_heldout_sampled.json)")
    args = p.parse_args(argv)
    cfg_path = os.path.join(args.run, "ppo", "ppo_config.json")
    for need in (os.path.join(args.run, "demo_config.json"), os.path.join(args.run, "rm"), cfg_path):
        if not os.path.exists(need):
            print(f"error: {need} is missing: pass the --out directory of a finished demo run", file=sys.stderr)
            return 2
    with open(cfg_path, encoding="utf-8") as f:
        ppo_cfg = json.load(f)  # base, template, answer length and temperature the policies were trained with
    adapters = {"SFT": os.path.join(args.run, "sft")}
    for spec in args.models:
        name, _, d = spec.partition("=")
        d = d or os.path.join(args.run, name.lower())
        if os.path.exists(os.path.join(d, "adapter_config.json")):
            adapters[name] = d
        else:
            print(f"{name}: no adapter in {d}, skipped")
    if args.base:
        adapters["base"] = None
    with open(os.path.join(DATA, "eval_questions.json"), encoding="utf-8") as f:
        questions = json.load(f)
    questions = questions[:args.questions] if args.questions else questions
    prompts = [{"id": q["id"], "messages": [{"role": "user", "content": q["query"]}], "reference": ""}
               for q in questions]
    temperature = args.temperature if args.temperature is not None else ppo_cfg["temperature"]
    rm = load_reward_model(os.path.join(args.run, "rm"), device=args.device, dtype=ppo_cfg["dtype"])
    per_seed, chars = {}, {}
    for seed in args.seeds:
        per_seed[seed], chars[seed] = sampled_rm_scores(ppo_cfg["model"], ppo_cfg["template"], adapters, prompts, rm,
                                                        args.k, temperature, ppo_cfg["max_new_tokens"], args.device,
                                                        ppo_cfg["dtype"], seed)
    names = [n for n in adapters if all(n in s for s in per_seed.values())]
    pooled = {n: [sum(per_seed[s][n][i] for s in args.seeds) / len(args.seeds) for i in range(len(prompts))]
              for n in names}
    print(f"{len(prompts)} questions x {args.k} answers x {len(args.seeds)} seed(s), temperature {temperature}, "
          f"{ppo_cfg['max_new_tokens']} tokens; reward-model score in units of its spread on SFT answers")
    res = {"questions": len(prompts), "k": args.k, "seeds": args.seeds, "temperature": temperature,
           "mean": {n: sum(v) / len(v) for n, v in pooled.items()}, "vs_SFT": {}, "per_seed": {},
           "chars": {n: sum(chars[s][n] for s in args.seeds) / len(args.seeds) for n in names}}
    # a score won by much shorter (or longer) answers says as much about the reward model's taste in length
    print("mean answer length: " + ", ".join(f"{n} {c:.0f} characters" for n, c in res["chars"].items()))
    for n in names:
        if n == "SFT":
            continue
        diffs = {f"seed {s}": paired_diff(per_seed[s][n], per_seed[s]["SFT"]) for s in args.seeds}
        diffs["pooled"] = paired_diff(pooled[n], pooled["SFT"])
        for label, d in diffs.items():
            lo, hi = d["diff_ci"] or (float("nan"), float("nan"))
            print(f"{n} - SFT, {label}: {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], higher on {d['higher']} and lower "
                  f"on {d['lower']} of {d['n']}")
        res["vs_SFT"][n] = diffs.pop("pooled")
        res["per_seed"][n] = diffs
    res["scores"] = {str(s): per_seed[s] for s in args.seeds}
    res["ids"] = [q["id"] for q in questions]
    out = args.out or os.path.join(args.run, "eval", "rm_heldout_sampled.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
