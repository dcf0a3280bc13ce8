"""The evaluation's reports: report.md of a pairwise, dialogue or metrics run, and the published numbers.

- PUBLISHED: HuatuoGPT's published tables (KUAKE-QIC_100 and Med-dialog_100 win/tie/loss, the
  Huatuo-26M test metrics); published_for picks the one that fits a run (by the data file's name
  for 'auto') so the report shows it beside ours.
- write_report: report.md of a pairwise or dialogue run: the judge and how verdicts were combined,
  win/tie/loss overall and per group with bootstrap intervals (winrate.tables' statistics), the
  length-controlled win rate, unjudged items, the published table, how consultations ended
  (dialogue), samples and usage.
- write_metrics_report: report.md of a metrics run: BLEU/GLEU/ROUGE/Distinct in one table with the
  published rows beside it, mean lengths, the references' own Distinct, samples and usage.
"""

import re
from pathlib import Path

import numpy as np

from .cli import UserError
from .textmetrics import METRICS
from .winrate import lc_text


# ---------------------------------------------------------------- published numbers

PUBLISHED = {
    "kuake-qic": {
        "match": "kuake-qic_100",
        "title": "HuatuoGPT-13B, single-turn, KUAKE-QIC_100, GPT-4 judge (win / tie / loss for HuatuoGPT)",
        "rows": [("vs ChatGPT", 47, 21, 32), ("vs ChatGLM-6B", 43, 18, 39), ("vs DoctorGLM", 95, 2, 3),
                 ("vs BenTsao", 98, 2, 0), ("vs GPT-4", 31, 17, 52)],
    },
    "med-dialog": {
        "match": "med-dialog_100",
        "title": "HuatuoGPT, multi-turn, Med-dialog_100, GPT-4 judge (win / tie / loss for HuatuoGPT)",
        "rows": [("vs ChatGPT", 62, 6, 32)],
    },
    "huatuo26m-test": {
        "match": "huatuo26m",  # with "test" in the name too
        "title": "Huatuo-26M test set, character level (HuatuoGPT paper)",
        "rows": [("HuatuoGPT", 27.42, 14.84, 8.54, 4.96, 8.01, 29.16, 8.29, 15.84, 0.74, 0.93),
                 ("T5 (fine-tuned)", 26.63, 16.74, 11.77, 8.46, 11.38, 33.21, 13.26, 24.85, 0.51, 0.68)],
    },
}


def published_for(kind: str, paths: list[str], choice: str) -> str | None:
    """Which published table fits this run: `choice` itself, or by the data file's name for 'auto'."""
    if choice == "none":
        return None
    if choice != "auto":
        if choice not in PUBLISHED:
            raise UserError(f"--published {choice!r}: use auto, none or one of {', '.join(PUBLISHED)}")
        return choice
    names = " ".join(Path(p).name.lower().replace(" ", "") for p in paths)
    if kind == "pairwise" and PUBLISHED["kuake-qic"]["match"] in names:
        return "kuake-qic"
    if kind == "dialogue" and PUBLISHED["med-dialog"]["match"] in names:
        return "med-dialog"
    if kind == "metrics" and re.search(r"huatuo[-_]?26m", names) and "test" in names:
        return "huatuo26m-test"
    return None


# ---------------------------------------------------------------- report.md

def _ci(s: dict, key: str) -> str:
    ci = s.get(f"{key}_ci")
    return f"{s[key]:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else (f"{s[key]:.1f}" if key in s else "–")


def _stats_row(name: str, s: dict) -> str:
    of_all = " / ".join(f"{s[f'{k}_pct_all']:.1f}" for k in ("win", "tie", "loss", "unjudged")) if s["items"] else "–"
    if not s.get("n"):
        return f"| {name} | 0 | – | – | – | – | – | {s['unjudged']} | {of_all} |"
    return (f"| {name} | {s['n']} | {s['win']} / {s['tie']} / {s['loss']} | {_ci(s, 'win_pct')} | {_ci(s, 'tie_pct')} "
            f"| {_ci(s, 'loss_pct')} | {_ci(s, 'winrate')} | {s.get('unjudged', 0)} | {of_all} |")


def _short(text: str | None, n: int) -> str:
    if text is None:
        return "(no answer)"
    text = " ".join(text.split())
    return (text[:n] + "…" if len(text) > n else text).replace("|", "\\|")


def write_report(out: Path, summary: dict, stats: dict | None, pairs: list[dict], group_name: str, cfg, extra) -> None:
    na, nb, mode = summary["a"], summary["b"], summary["mode"]
    lines = [f"# {'Single-turn pairwise' if mode == 'pairwise' else 'Multi-turn'} evaluation: {na} vs {nb}", "",
             f"Data: `{cfg.data}` ({len(pairs)} {'questions' if mode == 'pairwise' else 'cases'}). "
             f"Candidate A: **{na}**, candidate B: **{nb}**."]
    if extra:
        lines += ["", f"Patient: {extra['patient']}. At most {extra['max_turns']} doctor turns; stop rule: "
                      f"{extra['stop_rule']}" + (" (a doctor turn with a diagnosis, advice and no question ends it)."
                                                 if extra["stop_rule"] == "diagnosis" else ".")]
    if stats is None:
        lines += ["", "No judge (`--judge none`): answers only, in pairs.jsonl; make a sheet for doctors with "
                      "`python evaluate.py sheet`."]
    else:
        o = stats["overall"]
        offline = "offline" in summary["judge"]
        reference, things = ("reference answer", "questions") if mode == "pairwise" else ("real doctor's diagnosis", "cases")
        lines += ["", f"Judge: {summary['judge']}" + (" — **a deterministic similarity stand-in, not a model's judgement"
                                                       "; the numbers only show the pipeline working**" if offline else "")
                  + f". Every pair judged twice with the order swapped; verdicts combined by `{summary['combine']}`"
                  + (" (summed +1/0/-1: opposite verdicts are a tie)." if summary["combine"] == "sum" else
                     " (any disagreement is a tie).")
                  + f" The judge saw the {reference} for {summary['judge_saw_reference']} of {len(pairs)} {things}.",
                  "", f"## Win / tie / loss for {na}", "",
                  *([f"**Warning, {stats['length_shift']['warning']}.**", ""] if stats["length_shift"]["warning"] else []),
                  "Percentages of judged pairs with 95% bootstrap intervals over "
                  f"{'questions' if mode == 'pairwise' else 'cases'} ({cfg.bootstrap} resamples). "
                  "Win rate = win + tie / 2. The last column: win / tie / loss / unjudged as % of all items.", "",
                  f"| {group_name} | judged | W / T / L | win % | tie % | loss % | win rate | unjudged | % of all |",
                  "|---|---|---|---|---|---|---|---|---|", _stats_row("**overall**", o)]
        lines += [_stats_row(g, s) for g, s in stats["groups"].items()]
        if o.get("n"):
            lens_a = [p["len_a"] for p in pairs if p.get("outcome")]
            lens_b = [p["len_b"] for p in pairs if p.get("outcome")]
            lc = o["length_control"]
            lines += ["", "## Length-controlled win rate", "",
                      "LLM judges favour longer answers. Logistic fit of the outcome (win 1, tie 0.5, loss 0) on "
                      "tanh(length difference / its standard deviation), as AlpacaEval 2, read at equal length; "
                      "95% bootstrap intervals; slope > 0: the judge favours A when A is the longer.", "",
                      "| raw win rate | length-controlled win rate; length slope | A / B longer (equal) | "
                      "mean length A | mean length B |", "|---|---|---|---|---|",
                      f"| {_ci(o, 'winrate')} | {lc_text(lc)} | {lc['a_longer']} / {lc['b_longer']} ({lc['equal']}) | "
                      f"{np.mean(lens_a):.0f} | {np.mean(lens_b):.0f} |", "",
                      "Lengths in characters (whitespace excluded)" + (", doctor turns only." if mode == "dialogue" else ".")]
        unjudged = [p for p in pairs if p.get("outcome") is None]
        if unjudged:
            lines += ["", f"Unjudged ({len(unjudged)}, never counted as a win): " +
                      "; ".join(f"{p['id']}: {p['unjudged']}" for p in unjudged[:20])]
        lines += ["", "![win/tie/loss](winrate.png)"]
        pub = summary.get("published")
        if pub:
            t = PUBLISHED[pub]
            lines += ["", "## Published numbers on the same set", "", t["title"] + ":", "",
                      "| comparison | win | tie | loss |", "|---|---|---|---|"]
            lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in t["rows"]]
            lines += ["", f"Ours: {na} vs {nb}: {o.get('win', 0)} / {o.get('tie', 0)} / {o.get('loss', 0)} "
                          f"(counts out of {len(pairs)})."]
    if mode == "dialogue":
        stops = {}
        for p in pairs:
            for k in ("stopped_a", "stopped_b"):
                if p.get(k):
                    stops[(k[-1], p[k])] = stops.get((k[-1], p[k]), 0) + 1
        turns_a = [p["turns_a"] for p in pairs if p.get("turns_a")]
        turns_b = [p["turns_b"] for p in pairs if p.get("turns_b")]
        lines += ["", "## Consultations", "", "| candidate | mean doctor turns | ended by |", "|---|---|---|"]
        for name, key, turns in ((na, "a", turns_a), (nb, "b", turns_b)):
            ended = ", ".join(f"{why}: {n}" for (k, why), n in sorted(stops.items()) if k == key)
            lines.append(f"| {name} | {np.mean(turns):.1f} | {ended} |" if turns else f"| {name} | – | – |")
        lines += ["", "Transcripts: transcripts.jsonl."]
    lines += ["", "## Samples", ""]
    for p in pairs[:3]:
        lines += [f"**{p['id']}** ({p['group']}): {_short(p['prompt'], 200)}", "",
                  f"- A ({na}): {_short(p['answer_a'], 300)}", f"- B ({nb}): {_short(p['answer_b'], 300)}"]
        if p.get("outcome"):
            lines.append(f"- outcome for A: {p['outcome']} (verdicts {', '.join(str(v) for v in p['verdicts'])})")
        lines.append("")
    lines += ["Files: pairs.jsonl (one row per item), judgements.jsonl (every judge request with its reasoning), "
              "summary.json.", "", "Usage:", ""] + [f"- {u}" for u in summary.get("usage", [])]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def write_metrics_report(out: Path, summary: dict, scored: list) -> None:
    s = summary["scores"]
    head = "| model | " + " | ".join(k.upper().replace("BLEU-", "B").replace("ROUGE-", "R").replace("DISTINCT-", "D")
                                     for k in METRICS) + " |"
    rule = "|---" * (len(METRICS) + 1) + "|"
    fmt = lambda vals: " | ".join(f"{v:.2f}" for v in vals)
    lines = [f"# Reference metrics: {summary['model']}", "",
             f"Data: {', '.join(f'`{d}`' for d in summary['data'])} ({summary['items']} pairs, {summary['scored']} "
             "answered). Character level: NFKC, lower-case, whitespace dropped, every other character one token"
             + (" (punctuation kept)" if summary["keep_punct"] else " (punctuation dropped)") +
             f"; BLEU/GLEU {summary['level']} level (nltk's definition), ROUGE F1 averaged over answers, Distinct per "
             "answer averaged (see nanohuatuo/textmetrics.py). BLEU/GLEU/ROUGE x100, Distinct as a fraction."
             + (f" {summary['several_references']} answered items have several references, each scored against "
                "all of them (multi-reference BLEU/GLEU as nltk, the best ROUGE)." if summary.get("several_references")
                else ""), "",
             head, rule, f"| {summary['model']} | {fmt(s.values())} |"]
    pub = summary.get("published")
    if pub:
        lines += [f"| {r[0]} (published) | {fmt(r[1:])} |" for r in PUBLISHED[pub]["rows"]]
        lines += ["", PUBLISHED[pub]["title"] + "; the published table does not state its BLEU variant, so compare "
                                                "with care."]
    lines += ["", f"Mean answer length {summary['mean_length']:.0f} characters (references "
                  f"{summary['reference_mean_length']:.0f}); references' own Distinct-1/2: "
                  f"{summary['reference_distinct']['distinct-1']:.2f} / {summary['reference_distinct']['distinct-2']:.2f}.",
              "", "## Samples", ""]
    for it, a in scored[:3]:
        q = it["messages"][-1]["content"]
        lines += [f"**{it['id']}**: {_short(q, 200)}", "", f"- reference: {_short(it['reference'], 300)}",
                  f"- answer: {_short(a, 300)}", ""]
    lines += ["Files: answers.jsonl (question, reference, answer), summary.json.", "", "Usage:", ""]
    lines += [f"- {u}" for u in summary["usage"]] or ["- no requests"]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
