"""HuatuoGPT's evaluation, for our models and any OpenAI-compatible one.

    python evaluate.py metrics  --data test.jsonl --model runs/sft
    python evaluate.py pairwise --data KUAKE-QIC_100.json --a-model runs/ppo --b-base-url URL \\
        --b-model-name gpt-4o-mini --judge-base-url URL --judge-model-name gpt-4o
    python evaluate.py dialogue --data Med-dialog_100.json --a-model ... --b-model ... \\
        --patient-base-url URL --patient-model-name NAME --judge-base-url URL --judge-model-name NAME
    python evaluate.py sheet    --source runs/eval_pairwise --out runs/sheet
    python evaluate.py tally    --sheet runs/sheet --marks marks.csv

The modes, as the paper ran them:
- metrics: answers to a QA test set (our schema, Huatuo-26M questions/answers JSONL, cMedQA2
  questions.csv + answers.csv, Chinese-medical-dialogue CSV/JSONL; read by data.py's converters)
  scored against the doctors' replies (all of them when several doctors answered) with BLEU-1..4,
  GLEU, ROUGE-1/2/L and Distinct-1/2 at character level (textmetrics.py documents the variants).
- pairwise: questions in the KUAKE-QIC format (`id, label, query`, optionally `reference`: a real
  doctor's answer, shown to the judge as HuatuoGPT's feedback prompt shows it), two candidates'
  answers, a judge that reasons first and ends with "Assistant 1 is better than / worse than /
  equal to Assistant 2". Every pair is judged twice with the answers swapped; the two verdicts are
  summed (+1 win, 0 tie, -1 loss for candidate A), so opposite verdicts are a tie (`--combine strict`:
  any disagreement is a tie, as FastChat's MT-bench). A verdict the judge garbles is re-asked
  (llm.py), then the pair is unjudged: reported, never a win. Win/tie/loss overall and per intent
  with a bootstrap CI over questions, and a length-controlled win rate (below).
- dialogue: cases in the Med-dialog format (`id, medical_case, doctor_diagnosis, Department`).
  A patient model plays the patient from `medical_case`, one symptom at a time; each candidate
  consults for at most `--max-turns` doctor turns; the judge compares the two transcripts against
  the real doctor's diagnosis, order swapped as above; win/tie/loss per department.
  Stop rule (`gives_diagnosis_and_advice`): a doctor turn ends the consultation when it asks no
  question (no ？ or ?), names a diagnosis (考虑, 可能是, 诊断, 初步判断, 印象, 属于, 应该是, 多半是)
  and gives advice (建议, 治疗, 用药, 服用, 口服, 外用, 注意, 复查, 就诊, 就医, 检查).
- sheet / tally: a blind, shuffled side-by-side sheet (self-contained HTML + CSV) of a pairwise
  or dialogue run for doctors to mark; tally reads the marks back into win/tie/loss and their
  agreement with the automatic judge (percent and Cohen's kappa) and, with several raters, with one
  another (Fleiss' kappa) and each item's outcome by vote; the file formats are in sheets.py.

Candidates (answers.py): each side is one of our models (`--a-model DIR [--a-adapter DIR]`, generated in
batches on the engine), an OpenAI-compatible endpoint (`--a-base-url URL --a-model-name NAME`)
or a file of answers (`--a-answers FILE`, JSONL/JSON of {id, answer}). Answers are kept in one
JSONL per candidate under `--answers-dir` (default OUT/answers), keyed by what produced them
(model files, adapter, template, sampling settings), so a model answers once and every later
comparison that points at the same directory reuses it. Every LLM call (judge, patient,
endpoint candidates) goes through llm.LLM with a SQLite cache per role under `--cache` (default
OUT/cache): an interrupted run rerun with --resume sends only what it had not received. A
consultation is stored when it ends; one cut short is replayed, from the cache where the doctor
repeats itself (greedy decoding, a seeded or cached endpoint).

Offline (no network): `--judge offline` is a deterministic stand-in for a judge (character-bigram
similarity to the reference, textmetrics.similarity_score: the doctor's diagnosis in dialogue,
an item's `reference` in pairwise when it has one, else the question); `--patient offline` is a
stand-in that recites the case one sentence per turn. Both are labelled as such in the report.

Length control: AlpacaEval 2's GLM read at equal length, with bootstrap intervals, or "not identifiable
(reason)" when the pairs cannot support it; the terms kept, the intervals and the thresholds are in winrate.py.

Outputs in --out: report.md (tables, with HuatuoGPT's published numbers beside ours when the
set is the one they used), winrate.png (win/tie/loss bars), judgements.jsonl (every judge request
with its reasoning), pairs.jsonl (one row per question or case), transcripts.jsonl (dialogue),
summary.json (what run_* returns).

Python API (what the demo calls): run_metrics(MetricsConfig), run_pairwise(PairwiseConfig),
run_dialogue(DialogueConfig), make_sheet(SheetConfig), run_tally(TallyConfig); each returns the
summary dict.

Here: the judge (prompts, verdict parsing, the order swap), the configs, the runs and the CLI.
Below it: consult.py (the patient, the stop rule, the consultation loop), reports.py (report.md
and the published numbers), sheets.py (the sheet and the tally), answers.py (the candidates).
"""

import json
import re
import sys
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import data as qa_data
from . import sheets
from .answers import Candidate, GenerationSettings, get_answers
from .cli import UserError, arg, commands_main, prepare_out, write_config
from .consult import EndpointPatient, OfflinePatient, consult, render_transcript
from .evalsets import QA_FORMATS, load_cases, load_qa, load_questions
from .llm import from_flags, role_cache
from .metrics import plot_wtl
from .reports import PUBLISHED, published_for, write_metrics_report, write_report
from .textmetrics import chars, distinct, score_corpus, similarity_score
from .winrate import combine, length, tables


# ---------------------------------------------------------------- the judge

JUDGE_SYSTEM = "You are a helpful, precise and impartial medical expert who checks the quality of doctors' answers."

VERDICT_CRITERIA = (
    "1. To the point: it answers what the patient asked.\n"
    "2. Symptoms covered: it takes every symptom the patient described into account.\n"
    "3. Diagnosis: it gives the most reasonable diagnosis.\n"
    "4. Treatment: it proposes an effective treatment that fits the severity of the condition.\n"
    "5. Safety: prescriptions respect indications, contraindications and dosage.")

VERDICT_LINES = ("Assistant 1 is better than Assistant 2\n"
                 "Assistant 1 is worse than Assistant 2\n"
                 "Assistant 1 is equal to Assistant 2")

ASK_VERDICT = (
    "Avoid any position bias: the order in which the two are shown must not affect your judgement, "
    "and neither may their length on its own. First explain your reasoning in a few sentences, "
    "comparing the two. Then write the final verdict alone on the last line, exactly one of:\n" + VERDICT_LINES)


def pairwise_messages(question: str, answer_1: str, answer_2: str, reference: str | None = None) -> list[dict]:
    """The judge request for one single-turn question, method.md's structure:
    [Question] [Assistant 1] [Assistant 2] [System] criteria, reasoning first, verdict line last;
    with a [Reference Answer] after the question when the item has a real doctor's answer."""
    user = (f"[Question]\n{question.strip()}\n\n"
            + (f"[Reference Answer]\n{reference.strip()}\n\n" if reference else "") +
            f"[The Start of Assistant 1's Answer]\n{answer_1.strip() or '(no answer)'}\n[The End of Assistant 1's Answer]\n\n"
            f"[The Start of Assistant 2's Answer]\n{answer_2.strip() or '(no answer)'}\n[The End of Assistant 2's Answer]\n\n"
            "[System]\nWe would like to request your feedback on the performance of two AI assistants in response "
            "to the patient's question displayed above. "
            + ("A real doctor's reply is given as the reference answer: compare each answer with it for accuracy "
               "and professionalism; an answer need not share its wording, and one more complete and accurate "
               "than the reference is better. " if reference else "") +
            "Judge which answer is better by these criteria:\n"
            f"{VERDICT_CRITERIA}\n{ASK_VERDICT}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def dialogue_messages(case: str, diagnosis: str, transcript_1: str, transcript_2: str) -> list[dict]:
    """The judge request for two consultations of one case, against the real doctor's diagnosis."""
    user = (f"[Medical Case]\n{case.strip()}\n\n[Real Doctor's Diagnosis and Advice]\n{diagnosis.strip()}\n\n"
            f"[The Start of Assistant 1's Consultation]\n{transcript_1}\n[The End of Assistant 1's Consultation]\n\n"
            f"[The Start of Assistant 2's Consultation]\n{transcript_2}\n[The End of Assistant 2's Consultation]\n\n"
            "[System]\nTwo AI assistants each consulted the same patient, who was played from the case above and "
            "revealed it step by step. Compare each consultation with the real doctor's diagnosis and advice, and "
            "judge which assistant did better by these criteria:\n"
            f"{VERDICT_CRITERIA}\n6. Consultation: it asks the questions needed before concluding, and its diagnosis and "
            f"advice agree with the real doctor's.\n{ASK_VERDICT}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_VERDICT = re.compile(r"assistant\s*([12])\s*is\s*(better|worse|equal)\s*(?:than|to)\s*assistant\s*([12])",
                      re.IGNORECASE)
# a verdict sentence the line takes back: negated just before it, inside a concession or condition, or followed by
# another assistant ("..., so Assistant 2 wins")
_NEGATED = re.compile(r"(?:\b(?:not|cannot|can't|never)\b|不能|无法|不是|并非)[^.;:。；：]{0,25}$", re.IGNORECASE)
_CONCEDED = re.compile(r"^\W*(?:while|although|though|whereas|if|unless|虽然|尽管|如果)", re.IGNORECASE)
_ANOTHER = re.compile(r"assistant\s*[12]|助手\s*[12]", re.IGNORECASE)


def parse_verdict(text: str) -> str:
    """'1', '2' (the assistant shown in that place is better) or 'tie', from the verdict sentence on
    the reply's last line, where the prompt asks for it (the last one there, if several).

    Only the last line counts: a verdict-like sentence in the reasoning ("Assistant 2 is better than
    Assistant 1 at listing the symptoms") or a refusal quoting the options is not the verdict, and a
    last line that is none of the three sentences ("Assistant 1 is slightly better ...") is re-asked.
    Markdown decoration (** __ ` # and rules) and full-width characters are ignored; ValueError when
    the last line holds no verdict sentence, compares an assistant with itself, is an option of a
    ticked list, or qualifies the sentence ("I cannot say ...", "While ..., Assistant 2 wins")."""
    clean = re.sub(r"[*_`#]", "", unicodedata.normalize("NFKC", text or ""))
    lines = [line for line in clean.splitlines() if re.sub(r"[\s\-=>|]", "", line)]
    found = list(_VERDICT.finditer(lines[-1])) if lines else []
    if not found:
        raise ValueError("no verdict line" if not _VERDICT.search(clean) else "the last line is not a verdict")
    # an option of a ticked list ("- [ ] Assistant 1 is equal to Assistant 2"), or a verdict the line takes back
    # ("I cannot say ...", "While ... better ..., Assistant 2 wins"): what it says is not the sentence
    before, after = lines[-1][:found[0].start()], lines[-1][found[-1].end():]
    if (re.search(r"\[[ xX]?\]|[❌✗☐☒]", lines[-1]) or _NEGATED.search(before) or _CONCEDED.search(before)
            or _ANOTHER.search(after)):
        raise ValueError("the last line qualifies its verdict")
    values = set()
    for m in found:
        x, relation, y = m.groups()
        if x == y:
            raise ValueError("verdict compares an assistant with itself")
        values.add("tie" if relation.lower() == "equal" else (x if relation.lower() == "better" else y))
    if len(values) > 1:  # "... better ... in safety; overall ... worse ...", or the options quoted
        raise ValueError("the last line holds verdicts that disagree")
    return values.pop()


def verdict_followup(messages: list[dict], reply: str, reason: str) -> list[dict]:
    """Ask again for the verdict line after a reply without one."""
    return messages + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": "Your reply did not end with a valid verdict. Answer with one line "
                                                   "only, exactly one of:\n" + VERDICT_LINES}]


@dataclass
class Verdict:
    text: str | None
    value: str | None       # "1" | "2" | "tie" (as shown), None when unusable
    ok: bool
    error: str | None = None
    cached: bool = False


TIE_MARGIN = 0.005  # offline judge: scores closer than this are a tie


class OfflineJudge:
    """Deterministic stand-in for a judge: the answer more similar to the reference wins.

    textmetrics.similarity_score (character-bigram F1, minus repetition and length penalties) of
    each shown answer against the request's reference; no network, symmetric, so an order swap
    never changes its mind. Not a medical judgement."""

    name = "offline judge"

    def judge(self, requests: list[dict]) -> list[Verdict]:
        out = []
        for r in requests:
            s1, s2 = (similarity_score(a, r["reference"]) for a in r["shown"])
            line = ("Assistant 1 is equal to Assistant 2" if abs(s1 - s2) < TIE_MARGIN else
                    "Assistant 1 is better than Assistant 2" if s1 > s2 else "Assistant 1 is worse than Assistant 2")
            text = (f"Offline judge (a deterministic stand-in, not a medical judgement): similarity to the "
                    f"{r['reference_name']}: assistant 1 {s1:.4f}, assistant 2 {s2:.4f}.\n{line}")
            out.append(Verdict(text, parse_verdict(text), True))
        return out

    def summary(self) -> str:
        return "judge: offline (deterministic similarity stand-in), no requests"

    def close(self):
        pass


class EndpointJudge:
    """The judge behind an OpenAI-compatible endpoint: verdicts parsed, garbled ones re-asked."""

    def __init__(self, llm, temperature: float, max_tokens: int):
        self.llm, self.temperature, self.max_tokens = llm, temperature, max_tokens
        self.name = f"{llm.model} ({llm.base_url})"

    def judge(self, requests: list[dict]) -> list[Verdict]:
        answers = self.llm.map([{"messages": r["messages"], "temperature": self.temperature,
                                 "max_tokens": self.max_tokens} for r in requests],
                               parse=parse_verdict, followup=verdict_followup, desc="judging")
        return [Verdict(a.text, a.value if a.ok else None, a.ok, a.error, a.cached) for a in answers]

    def summary(self) -> str:
        return self.llm.summary()

    def close(self):
        self.llm.close()


def judge_swapped(judge, items: list[dict], build, a_name: str, b_name: str, rule: str):
    """Judge every item twice (A shown first, then B first) -> (judgement rows, outcome per item).

    items: {id, group, answer_a, answer_b, reference, reference_name, ...}; build(item, first, second)
    -> judge messages. An item whose answer is missing on either side is unjudged without a request."""
    requests, where = [], []
    for k, it in enumerate(items):
        if it["answer_a"] is None or it["answer_b"] is None:
            continue
        for order in ("AB", "BA"):
            first, second = (it["answer_a"], it["answer_b"]) if order == "AB" else (it["answer_b"], it["answer_a"])
            requests.append({"messages": build(it, first, second), "shown": (first, second),
                             "reference": it["reference"], "reference_name": it["reference_name"]})
            where.append((k, order))
    verdicts = judge.judge(requests) if requests else []
    rows, per_item = [], [dict() for _ in items]
    for (k, order), v, r in zip(where, verdicts, requests):
        side = None
        if v.ok:
            side = "tie" if v.value == "tie" else ("A" if (v.value == "1") == (order == "AB") else "B")
        per_item[k][order] = side
        rows.append({"id": items[k]["id"], "group": items[k]["group"], "order": order,
                     "assistant_1": a_name if order == "AB" else b_name,
                     "assistant_2": b_name if order == "AB" else a_name,
                     "verdict": side, "shown_verdict": v.value, "ok": v.ok, "error": v.error,
                     "cached": v.cached, "reasoning": v.text, "judge": judge.name})
    outcomes = []
    for it, got in zip(items, per_item):
        if it["answer_a"] is None or it["answer_b"] is None:
            outcomes.append((None, "no answer from " + (a_name if it["answer_a"] is None else b_name)))
        elif got.get("AB") is None or got.get("BA") is None:
            outcomes.append((None, "judge gave no usable verdict"))
        else:
            outcomes.append((combine(got["AB"], got["BA"], rule), None))
    return rows, outcomes


# ---------------------------------------------------------------- the judge and the patient from their flags

def role_llm(cfg, role: str, instead: str):
    """The llm.LLM of a role ("judge", "patient") from its flags: --ROLE-base-url and --ROLE-model-name
    (required), --ROLE-api-key, its cache under --cache."""
    model_name = getattr(cfg, f"{role}_model_name")
    if not (getattr(cfg, f"{role}_base_url") and model_name):
        raise UserError(f"the {role} needs --{role}-base-url URL and --{role}-model-name NAME ({instead})")
    return from_flags(cfg, role, cache=role_cache(cfg.cache, role, model_name))


def open_judge(cfg):
    if cfg.judge == "offline":
        return OfflineJudge()
    if cfg.judge == "endpoint":
        llm = role_llm(cfg, "judge", "or --judge offline for the deterministic stand-in, --judge none for answers only")
        return EndpointJudge(llm, cfg.judge_temperature, cfg.judge_max_new_tokens)
    if cfg.judge == "none":
        return None
    raise UserError(f"--judge {cfg.judge!r}: use endpoint, offline or none")


def open_patient(cfg):
    if cfg.patient == "offline":
        return OfflinePatient()
    if cfg.patient == "endpoint":
        llm = role_llm(cfg, "patient", "or --patient offline for the stand-in that recites the case")
        return EndpointPatient(llm, cfg.patient_temperature, cfg.patient_max_new_tokens)
    raise UserError(f"--patient {cfg.patient!r}: use endpoint or offline")


# ---------------------------------------------------------------- configs

@dataclass
class OutputFlags:
    out: str = arg("runs/eval", "output directory (report.md, judgements, caches)")
    resume: bool = arg(False, "continue the interrupted run in --out (cached answers and replies are reused)")
    overwrite: bool = arg(False, "delete what --out holds and start again")
    answers_dir: str = arg("", "directory of per-candidate answer files (default OUT/answers); point several "
                               "runs at one directory to generate each model's answers once")
    cache: str = arg("", "directory of the SQLite caches of LLM replies, one per role (default OUT/cache)")
    concurrency: int = arg(4, "requests in flight per endpoint", bounds="[1, inf)")
    limit: int = arg(0, "use only the first N items (0: all)", bounds="[0, inf)")
    seed: int = arg(0, "random seed (sampling, bootstrap, sheet shuffle)")


@dataclass
class GenerationFlags:
    device: str = arg("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = arg("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16")
    batch_size: int = arg(16, "our models: sequences decoded together", bounds="[1, inf)")
    max_new_tokens: int = arg(512, "answer length limit in tokens (max_tokens for endpoints)", bounds="[1, inf)")
    temperature: float = arg(0.0, "sampling temperature of the candidates (0: greedy)", bounds="[0, inf)")
    top_p: float = arg(1.0, "nucleus sampling of the candidates", bounds="(0, 1]")
    top_k: int = arg(0, "top-k sampling of our models (0: off)", bounds="[0, inf)")
    system: str = arg("", "system message for both candidates (empty: each model's own default)")
    compile: bool = arg(False, "our models: torch.compile the decode step (CUDA graphs on CUDA; fused element-wise "
                               "ops on CPU)")


CANDIDATE_HELP = {
    "model": ("", "our model directory (Hugging Face layout)"),
    "adapter": (None, "LoRA adapter directory (PEFT layout) on top of the model"),
    "base_url": ("", "OpenAI-compatible endpoint instead of our model (e.g. http://127.0.0.1:8000/v1)"),
    "model_name": ("", "model name at the endpoint"),
    "api_key": (None, "API key of the endpoint (default $NANOHUATUO_API_KEY, then $OPENAI_API_KEY)"),
    "answers": ("", "file of ready answers (JSONL/JSON of id, answer) instead of a model"),
    "name": ("", "name in the report (default: from the model directory or model name)"),
    "template": ("auto", "chat template of our model (auto: the model's own)"),
    "quant": ("none", "weight quantisation of our model: none (the --dtype), int8 (weight-only, one scale per row) "
                      "or nf4 (4-bit blocks), as chat's and serve's --quant; its name gets -int8 or -nf4"),
}


def _cand(side: str, what: str):
    default, help = CANDIDATE_HELP[what]
    return arg(default, f"candidate {side}: {help}")


@dataclass
class CandidateFlags:
    """Two candidates, A and B: each one of our models, an endpoint, or a file of answers."""
    a_model: str = _cand("A", "model")
    a_adapter: str | None = _cand("A", "adapter")
    a_base_url: str = _cand("A", "base_url")
    a_model_name: str = _cand("A", "model_name")
    a_api_key: str | None = _cand("A", "api_key")
    a_answers: str = _cand("A", "answers")
    a_name: str = _cand("A", "name")
    a_template: str = _cand("A", "template")
    a_quant: str = _cand("A", "quant")
    b_model: str = _cand("B", "model")
    b_adapter: str | None = _cand("B", "adapter")
    b_base_url: str = _cand("B", "base_url")
    b_model_name: str = _cand("B", "model_name")
    b_api_key: str | None = _cand("B", "api_key")
    b_answers: str = _cand("B", "answers")
    b_name: str = _cand("B", "name")
    b_template: str = _cand("B", "template")
    b_quant: str = _cand("B", "quant")


@dataclass
class JudgeFlags:
    judge: str = arg("endpoint", "who judges: endpoint (--judge-base-url, --judge-model-name), offline "
                                 "(deterministic similarity stand-in, no network) or none (answers only, for a sheet)",
                     choices=["endpoint", "offline", "none"])
    judge_base_url: str = arg("", "judge: OpenAI-compatible endpoint")
    judge_model_name: str = arg("", "judge: model name at --judge-base-url")
    judge_api_key: str | None = arg(None, "judge: API key (default $NANOHUATUO_API_KEY, $OPENAI_API_KEY)")
    judge_temperature: float = arg(0.0, "judge: sampling temperature", bounds="[0, inf)")
    judge_max_new_tokens: int = arg(1024, "judge: reply length limit", old=("--judge-max-tokens",), bounds="[1, inf)")
    combine: str = arg("sum", "two verdicts -> outcome: sum (HuatuoGPT: +1/0/-1 summed, opposite verdicts tie) "
                              "or strict (any disagreement is a tie, as FastChat)", choices=["sum", "strict"])
    bootstrap: int = arg(1000, "bootstrap resamples over questions for the confidence intervals", bounds="[0, inf)")
    published: str = arg("auto", "published HuatuoGPT table to show beside ours: auto (by data file name), none, "
                                 + ", ".join(PUBLISHED))


@dataclass
class PairwiseConfig(JudgeFlags, CandidateFlags, GenerationFlags, OutputFlags):
    out: str = arg("runs/eval_pairwise", "output directory (report.md, judgements, caches)")
    data: str = arg("data/eval_questions.json", "questions in the KUAKE-QIC format (JSON list of id, label, query)",
                    metavar="FILE")


@dataclass
class DialogueConfig(JudgeFlags, CandidateFlags, GenerationFlags, OutputFlags):
    out: str = arg("runs/eval_dialogue", "output directory (report.md, transcripts, judgements, caches)")
    data: str = arg("data/eval_dialogues.json", "cases in the Med-dialog format (JSON list of id, medical_case, "
                                                "doctor_diagnosis, Department)", metavar="FILE")
    max_turns: int = arg(5, "doctor turns per consultation at most", bounds="[1, inf)")
    stop_rule: str = arg("diagnosis", "diagnosis: stop at a doctor turn with a diagnosis and advice and no question; "
                                      "turns: always run --max-turns", choices=["diagnosis", "turns"])
    patient: str = arg("endpoint", "who plays the patient: endpoint (--patient-base-url, --patient-model-name) or "
                                   "offline (a stand-in reciting the case, no LLM)", choices=["endpoint", "offline"])
    patient_base_url: str = arg("", "patient: OpenAI-compatible endpoint")
    patient_model_name: str = arg("", "patient: model name at --patient-base-url")
    patient_api_key: str | None = arg(None, "patient: API key (default $NANOHUATUO_API_KEY, $OPENAI_API_KEY)")
    patient_temperature: float = arg(0.0, "patient: sampling temperature", bounds="[0, inf)")
    patient_max_new_tokens: int = arg(256, "patient: reply length limit", old=("--patient-max-tokens",),
                                      bounds="[1, inf)")


@dataclass
class MetricsConfig(GenerationFlags, OutputFlags):
    out: str = arg("runs/eval_metrics", "output directory (report.md, answers, caches)")
    data: list[str] = arg([], "QA test set file(s): our JSONL schema, Huatuo-26M JSONL, cMedQA2 questions.csv "
                              "answers.csv, Chinese-medical-dialogue CSV/JSONL", metavar="FILE")
    format: str = arg("auto", "format of --data", choices=list(QA_FORMATS))
    model: str = arg("", "our model directory (Hugging Face layout)")
    adapter: str | None = arg(None, "LoRA adapter directory (PEFT layout)")
    base_url: str = arg("", "OpenAI-compatible endpoint answering instead of our model")
    model_name: str = arg("", "model name at --base-url")
    api_key: str | None = arg(None, "API key (default $NANOHUATUO_API_KEY, $OPENAI_API_KEY)")
    answers: str = arg("", "file of ready answers (JSONL/JSON of id, answer) instead of a model")
    name: str = arg("", "name in the report (default from the model)")
    template: str = arg("auto", "chat template of our model")
    quant: str = arg("none", CANDIDATE_HELP["quant"][1])
    level: str = arg("corpus", "BLEU/GLEU level: corpus (nltk corpus_bleu) or sentence (smoothed, averaged)",
                     choices=["corpus", "sentence"])
    keep_punct: bool = arg(True, "count punctuation marks as characters")
    published: str = arg("auto", "published table to show beside ours: auto (by data file name), none, huatuo26m-test")


@dataclass
class SheetConfig:
    source: str = arg("", "a finished pairwise or dialogue output directory (its pairs.jsonl)", metavar="DIR")
    out: str = arg("runs/sheet", "output directory for sheet.html, sheet.csv and sheet_key.json")
    overwrite: bool = arg(False, "delete what --out holds and start again")
    seed: int = arg(0, "random seed of the blind shuffle")
    limit: int = arg(0, "put only the first N items of the shuffled order on the sheet (0: all)", bounds="[0, inf)")


@dataclass
class TallyConfig:
    sheet: str = arg("", "the sheet directory (holds sheet_key.json)", metavar="DIR")
    marks: list[str] = arg([], "marked CSV file(s), one per rater (columns item, mark)", metavar="FILE")
    out: str = arg("", "where tally.md and tally.json go (default: the sheet directory)")


def side(cfg, s: str) -> Candidate:
    g = lambda k: getattr(cfg, f"{s}_{k}")
    c = Candidate(g("name"), g("model"), g("adapter"), g("base_url"), g("model_name"), g("api_key"), g("answers"),
                  g("template"), g("quant"))
    c.kind(f"{s}-")
    return c


def generation_settings(cfg) -> GenerationSettings:
    return GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed, cfg.system)


def _setup(cfg):
    """Lock --out; the config with the default cache and answer directories filled in (a copy), also
    written as evaluate_config.json."""
    lock = prepare_out(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, inputs=cfg)
    cfg = replace(cfg, answers_dir=cfg.answers_dir or str(Path(cfg.out) / "answers"),
                  cache=cfg.cache or str(Path(cfg.out) / "cache"))
    write_config(cfg.out, cfg, "evaluate")
    return lock, cfg


def sides(cfg) -> tuple[Candidate, Candidate]:
    """The two candidates. With one name between them (two endpoints serving one model name, two
    `merged` directories) each is labelled with its side, "NAME (A)" and "NAME (B)": in the report,
    and in an endpoint's reply cache, which would otherwise give B A's replies. Stored answers keep
    the name alone (Candidate.own_label), so a later comparison reuses them."""
    a, b = side(cfg, "a"), side(cfg, "b")
    if a.label() == b.label():
        a, b = replace(a, side="A"), replace(b, side="B")
    return a, b


def finish(out: Path, summary: dict, usage: list[str]) -> dict:
    summary["usage"] = usage
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for line in usage:
        print(line)
    print(f"report: {out / 'report.md'}")
    return summary


# ---------------------------------------------------------------- runs

def run_pairwise(cfg: PairwiseConfig) -> dict:
    """Single-turn pairwise evaluation (see the module doc); returns the summary dict."""
    a, b = sides(cfg)
    questions = load_questions(cfg.data, cfg.limit)
    lock, cfg = _setup(cfg)
    with lock:
        s, usage = generation_settings(cfg), []
        items = [{"id": q["id"], "group": q["group"], "messages": [{"role": "user", "content": q["query"]}]}
                 for q in questions]
        answers_a = get_answers(a, s, items, cfg, usage)
        answers_b = get_answers(b, s, items, cfg, usage)
        na, nb = a.label(), b.label()
        pairs = [{"id": q["id"], "group": q["group"], "prompt": q["query"], "answer_a": x, "answer_b": y,
                  "reference": q.get("reference") or q["query"], "with_reference": bool(q.get("reference")),
                  "reference_name": "reference answer" if q.get("reference") else "question",
                  "len_a": length(x), "len_b": length(y)}
                 for q, x, y in zip(questions, answers_a, answers_b)]
        judge = open_judge(cfg)
        build = lambda it, first, second: pairwise_messages(it["prompt"], first, second,
                                                            it["reference"] if it["with_reference"] else None)
        return _judge_and_report(cfg, "pairwise", judge, pairs, build, na, nb, usage, "intent")


def _judge_and_report(cfg, mode, judge, pairs, build, na, nb, usage, group_name, extra=None) -> dict:
    out = Path(cfg.out)
    summary = {"mode": mode, "a": na, "b": nb, "data": cfg.data, "items": len(pairs), "usage": usage,
               "judge_saw_reference": sum(p["with_reference"] for p in pairs)}
    if judge is None:
        qa_data.write_jsonl(out / "pairs.jsonl", pairs)
        summary["judge"] = None
        write_report(out, summary, None, pairs, group_name, cfg, extra)
        return finish(out, summary, usage)
    try:
        rows, outcomes = judge_swapped(judge, pairs, build, na, nb, cfg.combine)
        usage.append(judge.summary())
    finally:
        judge.close()
    verdicts = {}
    for r in rows:
        verdicts.setdefault(r["id"], []).append(r["verdict"])
    for p, (o, why) in zip(pairs, outcomes):
        p["outcome"], p["unjudged"], p["verdicts"] = o, why, verdicts.get(p["id"], [])
    qa_data.write_jsonl(out / "judgements.jsonl", rows)
    qa_data.write_jsonl(out / "pairs.jsonl", pairs)
    stats = tables(pairs, outcomes, cfg.bootstrap, cfg.seed, (na, nb))
    if stats["length_shift"]["warning"]:
        print(f"warning: {stats['length_shift']['warning']}", file=sys.stderr)
    summary.update(judge=judge.name, combine=cfg.combine, stats=stats,
                   published=published_for(mode, [cfg.data], cfg.published))
    plot_wtl(out / "winrate.png", stats, f"{na} vs {nb} ({mode}, {judge.name})")
    write_report(out, summary, stats, pairs, group_name, cfg, extra)
    o = stats["overall"]
    print(f"{na} vs {nb}: {o.get('win', 0)} win / {o.get('tie', 0)} tie / {o.get('loss', 0)} loss"
          f"{', ' + str(o['unjudged']) + ' unjudged' if o['unjudged'] else ''}")
    return finish(out, summary, usage)


def run_dialogue(cfg: DialogueConfig) -> dict:
    """Multi-turn evaluation with a patient model (see the module doc); returns the summary dict."""
    a, b = sides(cfg)
    if cfg.max_turns < 1:
        raise UserError(f"--max-turns {cfg.max_turns}: need at least 1")
    cases = load_cases(cfg.data, cfg.limit)
    lock, cfg = _setup(cfg)
    with lock:
        out, s, usage = Path(cfg.out), generation_settings(cfg), []
        patient = open_patient(cfg)
        try:
            ta = consult(a, s, cases, patient, cfg, usage)
            tb = consult(b, s, cases, patient, cfg, usage)
            usage.append(patient.summary())
        finally:
            patient.close()
        na, nb = a.label(), b.label()
        qa_data.write_jsonl(out / "transcripts.jsonl", [
            {"id": case["id"], "group": case["group"], "candidate": name, "patient": patient.label, **(t or {})}
            for case, x, y in zip(cases, ta, tb) for name, t in ((na, x), (nb, y))])
        pairs = []
        for case, x, y in zip(cases, ta, tb):
            pair = {"id": case["id"], "group": case["group"], "prompt": case["medical_case"],
                    "reference": case["doctor_diagnosis"], "with_reference": True,
                    "reference_name": "real doctor's diagnosis"}
            for k, t in (("a", x), ("b", y)):  # t is None when that consultation broke off
                doctor = " ".join(turn["content"] for turn in t["transcript"] if turn["role"] == "doctor") if t else ""
                pair.update({f"answer_{k}": render_transcript(t["transcript"]) if t else None,
                             f"stopped_{k}": t and t["stopped"], f"turns_{k}": t and t["doctor_turns"],
                             f"len_{k}": length(doctor)})  # the length fit counts the doctor's words only
            pairs.append(pair)
        judge = open_judge(cfg)

        def build(it, first, second):
            return dialogue_messages(it["prompt"], it["reference"], first, second)
        return _judge_and_report(cfg, "dialogue", judge, pairs, build, na, nb, usage, "department",
                                 extra={"patient": patient.label, "max_turns": cfg.max_turns,
                                        "stop_rule": cfg.stop_rule})


def run_metrics(cfg: MetricsConfig) -> dict:
    """Reference metrics of one candidate's answers on a QA set; returns the summary dict."""
    c = Candidate(cfg.name, cfg.model, cfg.adapter, cfg.base_url, cfg.model_name, cfg.api_key, cfg.answers, cfg.template,
                  cfg.quant)
    c.kind()
    items = load_qa(cfg.data, cfg.format, cfg.limit)
    lock, cfg = _setup(cfg)
    with lock:
        out, usage = Path(cfg.out), []
        answers = get_answers(c, generation_settings(cfg), items, cfg, usage)
        scored = [(it, a) for it, a in zip(items, answers) if a is not None]
        scores = score_corpus([a for _, a in scored], [it["references"] for it, _ in scored], cfg.level, cfg.keep_punct)
        refs = [r for it, _ in scored for r in it["references"]]  # every doctor's reply, for their own statistics
        qa_data.write_jsonl(out / "answers.jsonl", [{"id": it["id"], "question": it["messages"], "reference": it["reference"],
                                             "references": it["references"], "answer": a} for it, a in zip(items, answers)])
        summary = {"mode": "metrics", "usage": usage, "model": c.label(), "data": cfg.data, "items": len(items),
                   "scored": len(scored), "level": cfg.level, "keep_punct": cfg.keep_punct, "scores": scores,
                   "several_references": sum(len(it["references"]) > 1 for it, _ in scored),
                   "reference_distinct": {f"distinct-{n}": float(np.mean([distinct(chars(r, cfg.keep_punct), n)
                                                                          for r in refs])) if refs else 0.0
                                          for n in (1, 2)},
                   "mean_length": float(np.mean([length(a) for _, a in scored])) if scored else 0.0,
                   "reference_mean_length": float(np.mean([length(r) for r in refs])) if refs else 0.0,
                   "published": published_for("metrics", cfg.data, cfg.published)}
        write_metrics_report(out, summary, scored)
        print(" ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        return finish(out, summary, usage)


# ---------------------------------------------------------------- human evaluation: sheet and tally

def make_sheet(cfg: SheetConfig) -> dict:
    """A blind, shuffled sheet of a pairwise/dialogue run: sheet.html, sheet.csv, sheet_key.json (sheets.py)."""
    return sheets.write_sheet(cfg.source, cfg.out, seed=cfg.seed, limit=cfg.limit, overwrite=cfg.overwrite)


def run_tally(cfg: TallyConfig) -> dict:
    """Marks back into win/tie/loss for candidate A, and agreement with the judge; writes tally.md/json."""
    meta = sheets.read_key(cfg.sheet)
    if not cfg.marks:
        raise UserError("pass --marks FILE (a marked sheet.csv or a downloaded marks CSV), one per rater")
    result = sheets.tally(meta, cfg.marks, cfg.sheet)
    lines = sheets.write_tally(Path(cfg.out or cfg.sheet), result, cfg.sheet, len(meta["items"]))
    print("\n".join(lines[4:]))
    return result


# ---------------------------------------------------------------- CLI

COMMANDS = {
    "metrics": (run_metrics, MetricsConfig, "reference metrics (BLEU, GLEU, ROUGE, Distinct) on a QA test set"),
    "pairwise": (run_pairwise, PairwiseConfig, "two candidates on KUAKE-QIC-format questions, judged with order swap"),
    "dialogue": (run_dialogue, DialogueConfig, "two candidates consulting a patient model on Med-dialog-format cases"),
    "sheet": (make_sheet, SheetConfig, "a blind side-by-side sheet (HTML + CSV) of a pairwise or dialogue run"),
    "tally": (run_tally, TallyConfig, "read doctors' marks back: win/tie/loss, agreement with the judge and between raters"),
}


def main(argv=None) -> int:
    return commands_main(COMMANDS, argv, prog="evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
