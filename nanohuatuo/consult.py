"""The multi-turn evaluation's consultations: a simulated patient, the stop rule, and the loop.

- PATIENT_SYSTEM: the patient model's prompt; patient_view and doctor_view: one transcript
  (turns {role: patient | doctor, content}) as each side's chat messages.
- gives_diagnosis_and_advice: the stop rule (stop_rule "diagnosis"): a doctor turn that asks no
  question (no ？ or ?), names a diagnosis (DIAGNOSIS_CUES) and gives advice (ADVICE_CUES) ends
  the consultation.
- EndpointPatient: an LLM plays the patient from the case, its own lines kept (textcheck.own_lines);
  OfflinePatient: a stand-in that recites the case one sentence per turn, without a network.
- consult: every case consulted by one candidate (answers.py: our model on the engine or an
  endpoint), open consultations advancing together (run_consultations: our model batch_size of
  them at a time, each next turn prefilling only what the conversation adds; an endpoint all of
  them), for at most `max_turns` doctor turns;
  finished transcripts are stored per candidate, keyed by the candidate, its sampling, the
  patient, the turn limit and the stop rule, and reused. render_transcript: a transcript as the
  judge reads it.
"""

import hashlib
import re
import sys
from pathlib import Path

from .answers import (AnswerStore, Candidate, GenerationSettings, LocalModel, candidate_key, open_candidate,
                      prompt_hash)
from .cli import UserError
from .llm import CUT
from .textcheck import own_lines


# ---------------------------------------------------------------- the patient and the stop rule

PATIENT_SYSTEM = (
    "你在扮演一位正在网上问诊的患者。下面是你的病情资料，只有你自己知道，医生看不到：\n{case}\n\n"
    "规则：第一次发言只用一两句话说出最主要的不适和你想问的问题，不要一次把资料全部说出来；"
    "之后医生问到什么，就根据资料如实回答什么，资料里没有的就说不清楚或没注意；"
    "像普通患者一样口语化，不用医学术语，不要自己下诊断；每次不超过80字；只输出患者说的话。")
PATIENT_OPENING = "（问诊开始。请说出你的第一句话。）"

DIAGNOSIS_CUES = ("考虑", "可能是", "诊断", "初步判断", "印象", "属于", "应该是", "多半是")
ADVICE_CUES = ("建议", "治疗", "用药", "服用", "口服", "外用", "注意", "复查", "就诊", "就医", "检查")


ASK_CUES = ("告诉我您", "结果告诉我", "请描述", "请提供", "请补充", "能否告知", "结果发给我")
# a courtesy question in a conclusion ("还有其他问题吗？") asks the patient nothing about the illness
_COURTESY = re.compile(r"(?:还有|有没有)(?:其他|别的|什么)(?:问题|疑问)(?:吗|呢)?[？?]")


def gives_diagnosis_and_advice(reply: str) -> bool:
    """The stop rule: no question asked (a closing courtesy question aside) and no information asked
    for ("…把结果告诉我"), a diagnosis named and advice given (cue words above)."""
    reply = _COURTESY.sub("", reply)
    return ("？" not in reply and "?" not in reply and not any(c in reply for c in ASK_CUES)
            and any(c in reply for c in DIAGNOSIS_CUES) and any(c in reply for c in ADVICE_CUES))


def patient_view(case: str, transcript: list[dict]) -> list[dict]:
    """The patient model's messages: its case as system text; its own turns are the assistant's."""
    messages = [{"role": "system", "content": PATIENT_SYSTEM.format(case=case.strip())},
                {"role": "user", "content": PATIENT_OPENING}]
    for turn in transcript:
        messages.append({"role": "assistant" if turn["role"] == "patient" else "user", "content": turn["content"]})
    return messages


def doctor_view(transcript: list[dict]) -> list[dict]:
    return [{"role": "user" if t["role"] == "patient" else "assistant", "content": t["content"]} for t in transcript]


def _clean_patient(text: str) -> str:
    """The patient's own words: its tag dropped (我： too), the doctor's lines it may go on to write cut off."""
    return re.sub(r"^我\s*[:：]\s*", "", own_lines(text, "patient"))


class EndpointPatient:
    """An LLM plays the patient (see PATIENT_SYSTEM)."""

    label = "LLM patient"

    def __init__(self, llm, temperature: float, max_tokens: int):
        self.llm, self.temperature, self.max_tokens = llm, temperature, max_tokens
        self.label = f"LLM patient: {llm.model}"

    def speak(self, cases: list[dict], transcripts: list[list[dict]]) -> list[str | None]:
        answers = self.llm.map([{"messages": patient_view(c["medical_case"], t), "temperature": self.temperature,
                                 "max_tokens": self.max_tokens} for c, t in zip(cases, transcripts)],
                               desc="patient speaking")
        return [(_clean_patient(a.text) if a.ok else "") or None for a in answers]

    def key(self) -> dict:
        return {"patient": self.llm.model, "patient_url": self.llm.base_url, "t": self.temperature,
                "max_tokens": self.max_tokens, "prompt": hashlib.sha1(PATIENT_SYSTEM.encode()).hexdigest()[:8],
                "turn": "own lines"}  # consultations stored before the doctor's lines were cut are not reused

    def summary(self) -> str:
        return self.llm.summary()

    def close(self):
        self.llm.close()


class OfflinePatient:
    """OFFLINE STAND-IN for the patient model (no LLM): recites the case, one sentence per turn.

    Opening: the first sentence of the description and the help wanted; then each later turn the
    next sentence of the description, the duration, allergies and history; then a closing line.
    It does not listen to the doctor: it only lets the pipeline run without a network."""

    label = "offline patient stand-in (recites the case one sentence per turn; not an LLM)"

    @staticmethod
    def facts(case: str) -> tuple[str, list[str]]:
        sections = dict(re.findall(r"([^\n：:]{1,12})[：:]\n(.*?)(?=\n[^\n：:]{1,12}[：:]\n|\Z)", case, re.S))
        sentences = lambda t: [s for s in re.split(r"(?<=[。！；!;])", t.replace("\n", "")) if s.strip()]
        description = sentences(sections.get("病情描述", "")) or sentences(case)
        ask = sections.get("希望获得的帮助", "").strip()
        opening = "医生您好，" + description[0] + (ask if ask else "")
        rest = description[1:] + [f"{k}：{sections[k].strip()}" for k in ("患病多久", "过敏史", "既往病史")
                                  if sections.get(k, "").strip()]
        return opening, rest

    def speak(self, cases, transcripts):
        out = []
        for case, t in zip(cases, transcripts):
            opening, rest = self.facts(case["medical_case"])
            said = sum(turn["role"] == "patient" for turn in t)
            out.append(opening if said == 0 else rest[said - 1] if said - 1 < len(rest) else "没有别的情况了，请问我该怎么办？")
        return out

    def key(self) -> dict:
        return {"patient": "offline"}

    def summary(self) -> str:
        return "patient: offline stand-in, no requests"

    def close(self):
        pass


# ---------------------------------------------------------------- the consultation loop

def consult(c: Candidate, s: GenerationSettings, cases: list[dict], patient, cfg,
            summaries: list[str]) -> list[dict | None]:
    """Transcripts of the candidate consulting every case (stored per candidate, reused when done);
    run_consultations runs the turns."""
    if c.kind() == "answers":
        raise UserError("dialogue: a candidate must be a model or an endpoint (--a-answers is for pairwise)")
    extra = {**patient.key(), "max_turns": cfg.max_turns, "stop_rule": cfg.stop_rule}
    store = AnswerStore(Path(cfg.answers_dir) / f"dialogue-{candidate_key(c, s, extra)}.jsonl")
    hashes = [prompt_hash([case["medical_case"]]) for case in cases]
    todo = [k for k, case in enumerate(cases) if store.get(case["id"], hashes[k]) is None]
    print(f"{c.label()}: {len(cases) - len(todo)}/{len(cases)} consultations in {store.path}, {len(todo)} to run",
          file=sys.stderr, flush=True)
    if todo:
        model = open_candidate(c, s, cfg)
        try:
            # our model: batch_size consultations at a time, all their turns, so each next turn finds its
            # conversation's keys still in the engine (LocalModel keep_prefixes) and each batch is stored
            # when done; an endpoint: all of them at once
            size = model.batch_size if isinstance(model, LocalModel) else len(todo)
            for b in range(0, len(todo), size):
                part = todo[b:b + size]
                where = f"consultations {b + 1}-{b + len(part)} of {len(todo)}, " if size < len(todo) else ""
                transcripts, stopped = run_consultations(model, [cases[k] for k in part], patient, cfg,
                                                         f"{c.label()}: {where}")
                store.add([{"id": cases[k]["id"], "hash": hashes[k], "transcript": t, "stopped": why,
                            "doctor_turns": sum(turn["role"] == "doctor" for turn in t)}
                           for k, t, why in zip(part, transcripts, stopped) if not why.endswith("no usable reply")])
            summaries.append(model.summary())
        finally:
            model.close()
    rows = [store.get(case["id"], h) for case, h in zip(cases, hashes)]
    cut = [sum(bool(t.get("cut")) for t in r["transcript"]) for r in rows if r]
    if any(cut):  # a judge marks an unfinished reply down: said, as pairwise says its cut answers
        summaries.append(f"{c.label()}: {sum(map(bool, cut))} of {len(cut)} consultations with a doctor turn cut "
                         f"before its end ({sum(cut)} turns, at --max-new-tokens {s.max_new_tokens} or a filter)")
    return rows


def run_consultations(model, cases: list[dict], patient, cfg, say: str) -> tuple[list[list[dict]], list[str]]:
    """(transcript, why it stopped) of each case, consulted by `model` (LocalModel or EndpointModel),
    all open consultations advancing together: one batch of patient turns, then one of doctor turns."""
    transcripts = [[] for _ in cases]
    stopped = {}
    active = list(range(len(cases)))
    for turn in range(cfg.max_turns):
        said = patient.speak([cases[k] for k in active], [transcripts[k] for k in active])
        for k, text in zip(active, said):
            if text is None:
                stopped[k] = "patient gave no usable reply"
            else:
                transcripts[k].append({"role": "patient", "content": text})
        active = [k for k in active if k not in stopped]
        if not active:
            break
        replies = model.respond([doctor_view(transcripts[k]) for k in active],
                                [f"{cases[k]['id']}:{turn}" for k in active])
        for k, (text, reason) in zip(active, replies):
            if text is None:
                stopped[k] = "doctor gave no usable reply"
                continue
            transcripts[k].append({"role": "doctor", "content": text})
            if reason in CUT:  # cut before its end (the length limit, a content filter): counted in the summary
                transcripts[k][-1]["cut"] = reason
            if cfg.stop_rule == "diagnosis" and gives_diagnosis_and_advice(text):
                stopped[k] = "diagnosis and advice"
            elif turn == cfg.max_turns - 1:
                stopped[k] = "turn limit"
        active = [k for k in active if k not in stopped]
        print(f"{say}turn {turn + 1}/{cfg.max_turns}, {len(active)} consultations still open", file=sys.stderr,
              flush=True)
        if not active:
            break
    return transcripts, [stopped[k] for k in range(len(cases))]


def render_transcript(transcript: list[dict]) -> str:
    return "\n".join(f"{'患者' if t['role'] == 'patient' else '医生'}：{t['content'].strip()}" for t in transcript)
