"""The demo's digest and report: the numbers summary.json keeps from each stage, and report.md.

Kept apart from demo.py so the recipe's chain of stages reads on its own; nothing here runs a model.
"""

import json
import os

from .winrate import lc_text


def ppo_trend(history, n=5):
    """Means over the first and last n PPO steps: one step's score is too noisy to read a trend from."""
    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None
    n = max(1, min(n, len(history) // 2))
    head, tail = history[:n], history[-n:]
    return {"trend_steps": n, "score_first": mean(head, "score"), "score_last": mean(tail, "score"),
            "kl_last": mean(tail, "kl"), "kl_max": max((r["kl"] for r in history), default=None),
            "kl_per_token_last": sum(r["kl"] for r in tail) / max(sum(r["response_length"] for r in tail), 1),
            "length_first": mean(head, "response_length"), "length_last": mean(tail, "response_length")}


def _wtl(s):
    o = (s.get("stats") or {}).get("overall", {})
    return {k: o.get(k) for k in ("n", "win", "tie", "loss", "unjudged", "winrate", "winrate_ci", "length_control",
                                  "win_pct_all", "tie_pct_all", "loss_pct_all", "unjudged_pct_all")}


def eval_digest(ev: dict, algos: list[str]) -> dict:
    """The numbers of the evaluation the summary keeps (the full results are in OUT/eval/*/summary.json).
    The first policy's comparisons keep the plain keys; every policy's are also under by_algo."""
    wtl = _wtl
    by_algo = {a: {"pairwise": wtl(ev["pairwise" + sfx]), "dialogue": wtl(ev["dialogue" + sfx]),
                   "mean_length": ev["metrics"][a].get("mean_length")}
               for a, sfx in zip(algos, ["", *[f"_{a.lower()}" for a in algos[1:]]])}
    return {"metrics": {k: v["scores"] for k, v in ev["metrics"].items()}, "by_algo": by_algo,
            "mean_length": {k: v.get("mean_length") for k, v in ev["metrics"].items()},
            "pairwise": wtl(ev["pairwise"]), "dialogue": wtl(ev["dialogue"]),
            **({"pairwise_base": wtl(ev["pairwise_base"])} if "pairwise_base" in ev else {}),
            "length_shift": {k: ((ev[k].get("stats") or {}).get("length_shift") or {}).get("warning")
                             for k in ("pairwise", "dialogue", "pairwise_base") if k in ev},
            "pairwise_groups": (ev["pairwise"].get("stats") or {}).get("groups", {}),
            "dialogue_groups": (ev["dialogue"].get("stats") or {}).get("groups", {}),
            "judge": ev["pairwise"].get("judge"), "patient": ev["patient"], "rm_heldout": ev.get("rm_heldout")}


# ----------------------------------------------------------------------------- the report

def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def _short(text, n=120):
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[:n] + "…"


def _wtl_row(name, w):
    if not w or w.get("n") is None:
        return f"| {name} | not judged | | | | |"
    ci = w.get("winrate_ci")
    of_all = " / ".join(_f(w.get(f"{k}_pct_all"), "{:.0f}") for k in ("win", "tie", "loss", "unjudged"))
    return (f"| {name} | {w['win']} / {w['tie']} / {w['loss']} | {_f(w.get('winrate'), '{:.1f}')}% "
            f"{'[' + ', '.join(f'{c:.0f}' for c in ci) + ']' if ci else ''} | {lc_text(w.get('length_control'))} | "
            f"{w.get('unjudged', 0)} | {of_all} |")


def _profile_lines(hot: dict, seconds: dict) -> list[str]:
    """Where the time goes (with --profile): each stage's functions with the most time of their own."""
    if not hot:
        return ["(`python demo.py --profile` adds where the time goes in each stage.)", ""]
    lines = ["Where the time goes (cProfile, own time; full listings in `profile/`):", "",
             "| stage | functions with the most own time |", "|---|---|"]
    for stage, funcs in hot.items():
        total = max(seconds.get(stage, 0.0), 1e-9)
        lines.append(f"| {stage} | " + "; ".join(f"`{f}` {t:.1f} s ({100 * t / total:.0f}%)" for f, t in funcs
                                                  if t >= 0.05) + " |")
    return lines + [""]


def rm_heldout_lines(h, algos) -> list[str]:
    if not h or not h.get("n"):
        return []
    def vs(res, a, k):
        p = res.get(f"{a}_vs_{k}")
        return "" if not p else (f"; {a} - {k} {p['diff']:+.2f} [{', '.join(f'{c:+.2f}' for c in p['diff_ci'] or [])}]"
                                 f", higher on {p['higher']} and lower on {p['lower']} of {p['n']}")
    def means(res):
        return ", ".join(f"{k} {v:.2f}" for k, v in res["mean"].items())
    lines = [f"On {h['n']} prompts RL never saw (the held-out doctor prompts and the single-turn questions), the "
             f"reward model scores the greedy answers: {means(h)}"
             + "".join(vs(h, a, k) for a in algos for k in ("SFT", "base"))
             + " (95% bootstrap intervals over prompts). This is what PPO and GRPO optimise, on new prompts; whether "
             "the answers are better is the judge's call below."]
    sm = h.get("sampled")
    if sm and sm.get("mean"):
        lines.append(f"The same prompts, {sm['k']} sampled answers each at temperature {sm['temperature']} (as PPO "
                     f"samples; mean score per prompt): {means(sm)}" + "".join(vs(sm, a, "SFT") for a in algos) + ". "
                     f"{h['n']} prompts are few for an effect of a few tenths of the reward model's spread: "
                     "`python tools/rm_heldout.py RUN_DIR` repeats the check on all 50 bundled questions, several "
                     "seeds pooled.")
    return lines + [""]


def rl_lines(s) -> list[str]:
    """Section 3: what each RL step did during training, and the three side by side when there are several."""
    lines, algos = [], s.get("algos", ["PPO"])
    for key in ("ppo", "dpo", "grpo"):
        r, name = s.get(key), key.upper()
        if r and key == "dpo":
            lines += ["### DPO", "",
                      f"{r.get('steps')} steps on the judge's rankings (no reward model). Loss {_f(r.get('first_loss'))} "
                      f"-> **{_f(r.get('last_loss'))}**; held-out preference accuracy "
                      f"{_f(r.get('eval_accuracy'), '{:.1%}')} (the policy's implicit reward ranks the better answer "
                      f"higher; chance 50%).", "", "![DPO](dpo/metrics.png)", ""]
        elif r:
            lines += [f"### {name}", "",
                      f"{r.get('steps')} steps. Mean reward-model score {_f(r.get('score_first'))} -> "
                      f"**{_f(r.get('score_last'))}** (means of the first and last {r.get('trend_steps')} steps); KL "
                      f"to the SFT model {_f(r.get('kl_last'), '{:.2f}')} at the end (at most "
                      f"{_f(r.get('kl_max'), '{:.2f}')}; "
                      + ("nats per answer" if key == "ppo" else "the k3 estimate per token, as GRPO's loss uses it")
                      + f"); answer length {_f(r.get('length_first'), '{:.0f}')} -> "
                      f"{_f(r.get('length_last'), '{:.0f}')} tokens. Scores are in units of the reward model's "
                      "spread on SFT samples.", "",
                      f"![{name}]({key}/curves.png)" + (" ![PPO statistics](ppo/ppo_stats.png)" if key == "ppo" else ""),
                      ""]
    if len(algos) > 1:
        e = s["eval"]
        h = e.get("rm_heldout") or {}
        lines += ["### Side by side (each against SFT, single-turn questions)", "",
                  "| algorithm | win / tie / loss | win rate [95% CI] | LC win rate; slope | mean answer length "
                  "(chars) | RM score on held-out prompts | seconds |", "|---|---|---|---|---:|---:|---:|"]
        for a in algos:
            w, r = e["by_algo"][a]["pairwise"], s.get(a.lower(), {})
            ci = w.get("winrate_ci")
            lines.append(f"| {a} | {w.get('win')} / {w.get('tie')} / {w.get('loss')} | {_f(w.get('winrate'), '{:.1f}')}%"
                         f"{' [' + ', '.join(f'{c:.0f}' for c in ci) + ']' if ci else ''} | "
                         f"{lc_text(w.get('length_control'))} | {_f(e['by_algo'][a].get('mean_length'), '{:.0f}')} | "
                         f"{_f(h.get('mean', {}).get(a), '{:.2f}')} | {_f(r.get('stage_seconds'), '{:.0f}')} |")
        lines.append(f"| SFT | | | | {_f(e['mean_length'].get('SFT'), '{:.0f}')} | "
                     f"{_f(h.get('mean', {}).get('SFT'), '{:.2f}')} | |")
        lines.append("")
    return lines + rm_heldout_lines(s["eval"].get("rm_heldout"), algos)


def write_report(out, s, ev, seconds):
    sft_r, rm_r, e, m = s["sft"], s["rm"], s["eval"], s["machine"]
    a = s.get("algos", ["PPO"])[0]  # the policy the detailed evaluation is about
    total = s.get("seconds") or sum(seconds.values())  # wall time, loading between stages included
    offline = not s["online"]
    lines = [
        "# nanohuatuo: the HuatuoGPT recipe, end to end", "",
        "> Not medical advice. The answers below come from a " +
        ("toy model trained for a few minutes on illustrative data." if "tiny" in s["model"] else
         "model trained with a short demo recipe."), "",
        f"**Model:** {s['model']} ({s['params'] / 1e6:.2f}M parameters; size profile {s['size_profile']}). "
        f"**AI feedback:** {s['judge']}. "
        f"**Evaluation judge:** {e['judge']}; **patient:** {e['patient']}.", "",
        "HuatuoGPT (Zhang et al., 2023) fine-tunes a chat model on a mix of fluent answers distilled from ChatGPT and "
        "terse but accurate replies of real doctors, then aligns it with reinforcement learning from AI feedback: an "
        "LLM ranks the model's answers with the real doctor's reply as the reference, a reward model learns the "
        "rankings, and PPO optimises the policy against it. It is evaluated by pairwise judging (single-turn "
        "questions and multi-turn consultations, each pair judged twice with the order swapped) and reference "
        "metrics. This run does every step on the bundled data"
        + (" with offline stand-ins for the LLM (a similarity judge and a patient that recites the case): they make "
           "the mechanics visible, not the quality." if offline else " with an LLM as teacher, judge and patient."),
        "",
        "## Time", "",
        "| stage | seconds | share |", "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {100 * v / max(total, 1e-9):.0f}% |" for k, v in seconds.items()],
        f"| **total** | **{total:.1f}** ({total / 60:.1f} min wall time, loading included) | |", "",
        f"Machine: {m['cpu']}, {m['threads']} threads, {m['device']}; torch {m['torch']}, Python {m['python']}.", "",
        *_profile_lines(s.get("profile") or {}, seconds),
        "## 1. Supervised fine-tuning", "",
        f"{sft_r.get('steps')} steps on the four sources (held-out loss {_f(sft_r.get('first_eval_loss'))} before "
        f"training, {_f(sft_r.get('eval_loss'))} after).", "",
        "![SFT loss](sft/loss.png)", "",
        "## 2. AI feedback and the reward model", "",
        f"The SFT model sampled {s['size']['k']} answers to each of {s['size']['rl_prompts']} real-doctor prompts; "
        f"the judge ranked them against the doctor's reply. The reward model (pairwise loss over every pair of a "
        f"ranking) reached **{_f(rm_r.get('eval_accuracy'), '{:.1%}')}** held-out pairwise accuracy on "
        f"{rm_r.get('eval_pairs')} pairs (chance: 50%).", "",
        "![reward model](rm/metrics.png)", "",
        "## 3. Reinforcement learning after SFT", "",
        *rl_lines(s),
        f"## 4. Evaluation (HuatuoGPT's protocol): {a} against SFT", "",
        "Pairwise: each question is answered by both models and judged twice, the order swapped; the two verdicts "
        "are summed, so opposite verdicts are a tie. Win rate = win + tie / 2, with a bootstrap 95% interval over "
        "questions; LC = length-controlled win rate (the verdict fitted on the length difference, read at equal "
        "length; not identifiable when one answer is the longer in nearly every pair), with the length slope.", "",
        f"| comparison ({a} vs SFT) | win / tie / loss | win rate [95% CI] | LC win rate [95% CI]; length slope | "
        "unjudged | W / T / L / unjudged, % of all items |",
        "|---|---|---|---|---|---|",
        _wtl_row("single-turn questions (KUAKE-QIC format)", e["pairwise"]),
        _wtl_row("multi-turn consultations (Med-dialog format)", e["dialogue"]),
        *([_wtl_row(f"single-turn questions, {a} vs the base model", e["pairwise_base"])] if "pairwise_base" in e
          else []), "",
        *[f"**Warning ({k}), {w}.**\n" for k, w in e.get("length_shift", {}).items() if w],
        "![single-turn](eval/pairwise/winrate.png) ![multi-turn](eval/dialogue/winrate.png)", "",
    ]
    if e["pairwise_groups"]:
        lines += ["Per intent (single-turn):", "", "| intent | win / tie / loss |", "|---|---|",
                  *[f"| {g} | {v.get('win', 0)} / {v.get('tie', 0)} / {v.get('loss', 0)} |"
                    for g, v in e["pairwise_groups"].items()], ""]
    metric_names = list(next(iter(e["metrics"].values()), {}).keys())
    lines += ["Reference metrics on held-out real-doctor answers (character level, as HuatuoGPT's tables; "
              "evaluate.py documents the variants):", "",
              "| model | " + " | ".join(metric_names) + " |", "|---|" + "---:|" * len(metric_names),
              *[f"| {name} | " + " | ".join(f"{v[k]:.2f}" for k in metric_names) + " |"
                for name, v in e["metrics"].items()], ""]
    # answers side by side: the first policy and SFT from the pairwise run, the base model's from the run against it
    def read_pairs(name):
        path = os.path.join(out, "eval", name, "pairs.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    base_answers = {p["id"]: p["answer_b"] for p in read_pairs("pairwise_base")}
    pairs = read_pairs("pairwise")[:4]
    if pairs:
        lines += ["## Sample answers (greedy, questions held out of training)", ""]
        for p in pairs:
            lines += [f"**{p['group']}:** {p['prompt']}", ""]
            if p["id"] in base_answers:
                lines.append(f"- base: {_short(base_answers[p['id']], 200)}")
            lines += [f"- SFT: {_short(p['answer_b'], 200)}", f"- {a}: {_short(p['answer_a'], 200)}",
                      f"- verdict: {p.get('outcome') or 'unjudged'} for {a} against SFT", ""]
    lines += ["## What to run next", "",
              "- The same recipe with LoRA on a real checkpoint: `python demo.py --model /models/Qwen2.5-0.5B-Instruct` "
              "(the size profile follows the device: `--size cpu` under 20 minutes for a 100-700M model on two "
              "cores, `--size gpu-24g` for 0.5-7B on one 24 GB GPU).",
              *(["- A real judge, teacher and patient: `--llm-base-url URL --llm-model-name NAME` (any "
                 "OpenAI-compatible endpoint, e.g. vLLM or `serve.py`)."] if offline else []),
              "- Each stage on its own, with your data: the README's pipeline table; HuatuoGPT's own evaluation sets "
              "with `python evaluate.py pairwise --data KUAKE-QIC_100.json ...` and `python evaluate.py dialogue "
              "--data Med-dialog_100.json ...`.", ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
