"""Distillation: HuatuoGPT's data-making pipeline, as three commands against any OpenAI-compatible
endpoint (a cloud model, vLLM, or our own serve.py). Each writes rows of the conversation schema
(nanohuatuo/data.py) with `source` set to the HuatuoGPT source it makes, ready for
`python data.py mix` and train_sft.py:

    python distill.py instructions --seeds data/distill_seeds.jsonl --limit 1000 --out di.jsonl \\
        --teacher-base-url URL --teacher-model-name NAME   # -> distilled_instructions
    python distill.py conversations --data cases.jsonl --out dc.jsonl ...
                                                     # -> distilled_conversations
    python distill.py polish --data real.jsonl --out polished.jsonl ...
                                                     # -> real_doctor_instructions / _conversations

- instructions (self-instruct): each request shows a few sampled seed instructions and one sampled
  focus, a department or a role, and asks for new instructions. A new one is kept if it passes
  simple filters (textcheck.instruction_problem: length, Chinese, no refusal, no picture needed)
  and its character ROUGE-L against everything kept so far (seeds included) is at most 0.7, as in
  Self-Instruct (textmetrics.RougeIndex: exact, an inverted index bounds every pair in C before any
  LCS); then each kept instruction is answered. Rows record `department` or `role`.
- conversations: two agents, a patient and a doctor (one endpoint, or two with --patient-* and
  --doctor-*), share a background built from a real case: a schema row (the patient's question and
  the real doctor's reply) or a Med-dialog case ({"medical_case", "doctor_diagnosis",
  "Department"}). The patient knows the case and reveals it bit by bit; the doctor sees only the
  real doctor's conclusion, as a hint, and asks follow-up questions. A conversation ends when the
  doctor (or the patient) writes END_MARK, or after --max-turns doctor turns (`stop` in the row).
- polish: every doctor reply (single-turn rows and each doctor turn of a conversation) is rewritten
  to be clear, complete and warm; the original stays beside it (`original` on the message). A
  rewrite whose drug names or numbers differ from the original's (textcheck.fact_check) gets `flag`
  on the message and, by default (--on-flag original), gives way to the doctor's own reply (the
  rewrite kept as `rewrite`): a wrong dose must not reach SFT. --on-flag keep keeps it and marks
  the row `flagged`, which `data mix` drops unless --keep-flagged; --on-flag drop drops the row.

Every LLM call goes through nanohuatuo.llm.LLM: cached in SQLite (default <out>.cache.sqlite), so a
rerun of an interrupted command resumes without repeating a request (requests are a pure function
of the inputs, the seed and the cached replies); malformed replies are re-asked (showing the model
its reply and a nudge, NUDGES), then skipped and counted. Each command prints a summary (requests,
tokens, items kept, items dropped by reason) and returns it as a dict.

Python API: run_instructions(cfg), run_conversations(cfg), run_polish(cfg) with
InstructionsConfig / ConversationsConfig / PolishConfig (or command_config(name, argv) from flags).

All prompts are the constants below, in Chinese, written for this project.
"""

import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .cli import UserError, arg, cli_main, endpoint_flags, parse_config
from .data import DataError, iter_jsonl, row_id, validate, write_jsonl
from .evalsets import load_cases
from .llm import LLM, cache_file, from_flags
from .textcheck import fact_check, instruction_problem, is_refusal, own_lines
from .textmetrics import RougeIndex

# ---------------------------------------------------------------- prompts and vocabularies

# HuatuoGPT's 20 evaluation departments and the askers its self-instruct step samples.
DEPARTMENTS = ("皮肤科", "儿科", "骨科", "泌尿外科", "内科", "妇科", "妇产科", "皮肤性病科", "中医科", "眼科",
               "消化内科", "产科", "外科", "神经内科", "神经外科", "口腔科", "精神科", "心血管内科", "普外科", "男科")
ROLES = {  # role -> what such a person asks about (shown in the prompt)
    "患者": "描述自己的症状和担心，想知道是什么病、要不要紧、怎么治",
    "患者家属": "替孩子、父母或伴侣咨询，关心病情判断、照护方法和就医安排",
    "医生": "临床工作中的鉴别诊断、检查选择、治疗方案和指南要点",
    "护士": "护理操作、病情观察、健康宣教和用药护理",
    "药师": "药物作用、相互作用、剂量调整、特殊人群用药和用药交代",
    "医学生": "医学知识、发病机制、诊断思路和学习中遇到的问题",
    "康复治疗师": "功能评估、康复训练方案和训练中的注意事项",
    "健康管理师": "慢病管理、体检报告解读、饮食运动等生活方式干预",
}

INSTRUCTION_PROMPT = """你是一名医学教育专家，正在为中文医疗助手编写训练用的指令（用户会提出的问题或任务）。
下面是几条示例指令：
{examples}

请再写{n}条新的指令，要求：
1. {focus}
2. 每条指令都是真实用户会向医疗助手提出的问题或任务，内容具体、自成一体，不依赖图片、化验单照片或附件；
3. 类型要多样：症状咨询、病因分析、检查和指标解读、治疗和用药、护理和康复、预防和生活方式、知识讲解、写作任务等；
4. 不要与示例或彼此重复，用简体中文书写，每条不超过100字；
5. 只输出指令本身，每条一行，以序号开头，例如“1. ……”。"""
FOCUS_DEPARTMENT = "所有指令都与{department}有关：该科常见疾病的症状、检查、诊断、治疗、护理或预防。"
FOCUS_ROLE = "所有指令的提问者都是{role}，用{role}的身份和口吻提出，内容符合其关注点：{hint}。"

ANSWER_SYSTEM = """你是一位知识渊博、耐心细致的医学专家。请用简体中文回答用户的医疗问题或完成其任务：
内容准确、条理清晰、详细而温暖；涉及用药时说明用法和注意事项；病情可能严重时建议及时就医。
直接回答，不要说你是人工智能。"""

END_MARK = "【问诊结束】"  # either agent writes it to end the consultation (the stop rule)

PATIENT_SYSTEM = """你正在线上问诊平台向医生咨询，请扮演下面这份病例中的患者（如果病例显示是替孩子或家人咨询，就以家属的身份说话）。
病例资料（只有你知道，医生看不到）：
{case}

规则：
1. 第一次发言只说最主要的不适和想咨询的问题，一两句话，口语化；
2. 之后只回答医生问到的内容，每次透露一点，不要一次把资料全部说出；资料里没有的细节可以合理补充，但不能与资料矛盾；
3. 像普通人一样说话，不要堆砌医学术语，也不要替医生下诊断；
4. 医生已经给出诊断和建议、你也没有别的问题时，简单道谢，并在最后写上“{end}”；
5. 只输出你要说的话，不要加“患者：”之类的前缀。"""
PATIENT_START = "（问诊开始，请说出你的第一句话。）"

DOCTOR_SYSTEM = """你是一位经验丰富、耐心温和的{department}医生，正在线上接诊。
{reference}规则：
1. 信息不足时先有针对性地追问（每次不超过3个问题），不要一开始就下结论；
2. 信息足够后给出可能的诊断及依据、处理建议（检查、用药及注意事项）和需要尽快就医的情况，准确、详细、温暖；
3. 已经给出诊断和建议、患者也没有新的问题时，在回复最后写上“{end}”；
4. 只输出你要对患者说的话，不要加“医生：”之类的前缀。"""
DOCTOR_REFERENCE = """同一病例中真实医生的意见如下，供你把握方向（不要照抄，也不要在问清病情之前直接说出）：
{reference}

"""

POLISH_PROMPT = """下面是线上问诊中真实医生的一条回复，内容专业，但简短、口语化。请在不改变医学内容的前提下，把它改写得清晰、完整、温暖：
1. 保留原回复中的全部判断、药名、剂量、次数、时间和数值，不要增加原回复没有的药物、剂量或检查；
2. 可以解释原因、把建议整理得更有条理、加上关心的话；
3. 用简体中文，以医生的口吻直接对患者说，只输出改写后的回复。

{context}医生的原回复：
{reply}"""
POLISH_CONTEXT = "对话记录：\n{dialogue}\n\n"

# Sent after an unusable reply, with that reply, so the next ask differs even from a seeded or greedy endpoint.
NUDGES = {
    "instructions": "格式不对。请重新输出：只写指令本身，每条一行，以序号开头，例如“1. ……”。",
    "answer": "请直接用简体中文回答上面的问题，内容准确、具体。",
    "turn": "请只输出你这一轮要说的话，一两句到一段，不要加前缀。",
    "polish": "请直接输出改写后的医生回复，不要加任何说明。",
}


# ---------------------------------------------------------------- reply parsers (text checks: textcheck.py)


_ITEM = re.compile(r"^\s*(?:[-*•]\s*)?[(（]?\d{1,3}\s*[.．、:：)）]\s*(.*\S)")  # not "10 条指令如下" nor "3 小时后"
_QUOTES = "\"'“”‘’「」『』"


def parse_instructions(text: str) -> list[str]:
    """The numbered items of a reply ('1. ...', '2、...', '(3) ...'), quotes and 指令： stripped; an
    indented line right below an item continues it. Raises ValueError when there is none, so the
    request is asked again."""
    items, open_item = [], False
    for line in (text or "").splitlines():
        m = _ITEM.match(line)
        if not m:
            # an item not yet ended ("…有高血压十年，") wraps onto this indented line; a sub-line under a whole one
            # ("   - 类型：症状咨询") is not the item
            if open_item and line[:1].isspace() and line.strip() and items and items[-1][-1] not in "。？！?!.":
                more = line.strip().strip(_QUOTES)
                items[-1] += (" " if items[-1][-1].isascii() and more[:1].isascii() else "") + more
            else:
                open_item = False
            continue
        open_item = True
        item = m.group(1).strip()
        for prefix in ("指令：", "指令:", "问题：", "问题:", "任务：", "任务:"):
            if item.startswith(prefix):
                item = item[len(prefix):].strip()
        item = item.strip(_QUOTES).strip()
        if item:
            items.append(item)
    if not items:
        raise ValueError("no numbered instructions")
    return items


def parse_answer(text: str) -> str:
    """A usable answer: not empty, no refusal; ValueError(reason) otherwise."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty answer")
    if is_refusal(text):
        raise ValueError("refusal")
    return text


def parse_turn(text: str, speaker: str) -> tuple[str, bool]:
    """(utterance, ended) from an agent's reply: END_MARK found and removed, then its own lines
    (textcheck.own_lines: a leading speaker tag dropped, the other side's lines cut off)."""
    text = (text or "").strip()
    # the mark in any brackets ("（问诊结束）", "**问诊结束**"), or bare at the end of a line ("谢谢医生，问诊结束。"); a
    # sentence that mentions it ("等问诊结束后我会开检查单") neither ends the consultation nor loses the words
    bare = re.escape(END_MARK.strip("【】"))
    mark = re.compile(rf"[【\[（(]\s*{bare}\s*[】\]）)]|\*\*\s*{bare}\s*\*\*|{bare}[ \t]*[。.!！]?[ \t]*(?=\n|$)")
    ended = bool(mark.search(text))
    text = own_lines(mark.sub("", text), speaker).rstrip("，,、 ")  # "谢谢医生，问诊结束。" leaves no comma
    if not text and not ended:
        raise ValueError("empty turn")
    if is_refusal(text):
        raise ValueError("refusal")
    return text, ended


def parse_patient(text: str) -> tuple[str, bool]:
    return parse_turn(text, "patient")


def parse_doctor(text: str) -> tuple[str, bool]:
    said, ended = parse_turn(text, "doctor")
    if not said:
        raise ValueError("empty turn")
    return said, ended


# the rewriter's own words about its rewrite, not the reply: 好的，以下是改写后的回复： / （改写说明：语气更温和）
_PREAMBLE = re.compile(r"^\**\s*(?:好的|以下|下面)?[^\n]{0,20}(?:改写|润色|修改)[^\n]{0,20}[：:]\s*\**\s*\n")
_CLOSING = re.compile(r"\n\s*[（(]?\s*(?:改写|润色|修改)说明\s*[：:][^\n]*$")


def parse_polished(text: str) -> str:
    """A usable rewrite: the reply itself (a leading 好的，以下是改写后的回复：, 改写后： or 医生： and a closing
    （改写说明：…） dropped), no refusal."""
    text = _CLOSING.sub("", _PREAMBLE.sub("", (text or "").strip())).strip()
    for prefix in ("改写后的回复：", "改写后：", "改写：", "医生：", "医生:"):
        if text.lstrip("*").startswith(prefix):
            text = text.lstrip("*")[len(prefix):].lstrip("*").strip()
    if not text:
        raise ValueError("empty rewrite")
    if is_refusal(text):
        raise ValueError("refusal")
    return text


def nudge(kind: str):
    """LLM followup for a re-ask: the conversation so far, the unusable reply, and NUDGES[kind]."""
    def followup(messages: list[dict], reply: str, reason: str) -> list[dict]:
        return messages + [{"role": "assistant", "content": reply or "（空）"},
                           {"role": "user", "content": NUDGES[kind]}]
    return followup


# ---------------------------------------------------------------- configs


TeacherFlags = endpoint_flags("teacher", "the teacher LLM", old={"base_url": ("--base-url",),
                                                                 "model_name": ("--model-name",),
                                                                 "api_key": ("--api-key",)})


@dataclass
class EndpointConfig(TeacherFlags):
    """Flags every command shares: the teacher's OpenAI-compatible endpoint, the cache and the output."""
    out: str = arg("", "output JSONL file (conversation schema)", metavar="FILE")
    cache: str = arg("", "SQLite reply cache; a rerun resumes from it (default: <out>.cache.sqlite; 'none': off)",
                     metavar="FILE")
    concurrency: int = arg(4, "requests in flight at once", bounds="[1, inf)")
    attempts: int = arg(3, "asks per item before a malformed reply is skipped and counted", bounds="[1, inf)")
    timeout: float = arg(120.0, "seconds per request", bounds="(0, inf)")
    max_new_tokens: int = arg(1024, "most tokens per reply (the request's max_tokens)", bounds="[1, inf)")
    temperature: float = arg(0.7, "sampling temperature of the replies", bounds="[0, inf)")
    seed: int = arg(0, "random seed (sampling of seeds/focus; request seeds)")


@dataclass
class InstructionsConfig(EndpointConfig):
    """python distill.py instructions: self-instruct from seed instructions."""
    seeds: str = arg("", "seed instructions, JSONL {instruction, department?, role?} (default: the bundled "
                     "data/distill_seeds.jsonl)", metavar="FILE")
    limit: int = arg(100, "instructions to keep (each is then answered)", old=("--n",), bounds="[1, inf)")
    per_request: int = arg(5, "new instructions asked for in one request", bounds="[1, inf)")
    examples: int = arg(3, "seed instructions shown in one request", bounds="[0, inf)")
    role_share: float = arg(0.5, "share of requests that sample a role; the others sample a department",
                            bounds="[0, 1]")
    rouge: float = arg(0.7, "keep an instruction only if its character ROUGE-L with every kept one is at most this",
                       bounds="[0, 1]")
    min_chars: int = arg(6, "shortest instruction kept (characters)", bounds="[0, inf)")
    max_chars: int = arg(200, "longest instruction kept (characters)", bounds="[1, inf)")
    max_requests: int = arg(0, "give up after this many generation requests (0: 4 * n / per-request + 10)",
                            bounds="[0, inf)")
    instruction_temperature: float = arg(1.0, "sampling temperature when writing instructions", bounds="[0, inf)")


@dataclass
class ConversationsConfig(EndpointConfig):
    """python distill.py conversations: patient and doctor agents on real cases."""
    data: list[str] = arg([], "cases: schema JSONL rows, or Med-dialog JSON/JSONL {medical_case, "
                              "doctor_diagnosis, Department}", metavar="FILE", old=("--cases",))
    limit: int = arg(0, "use only the first N cases (0: all)", bounds="[0, inf)")
    max_turns: int = arg(4, "most doctor turns in one conversation", bounds="[1, inf)")
    patient_base_url: str = arg("", "patient agent's endpoint (default: --teacher-base-url)", metavar="URL")
    patient_model_name: str = arg("", "patient agent's model (default: --teacher-model-name)", metavar="NAME")
    patient_api_key: str | None = arg(None, "patient agent's API key (default: --teacher-api-key)")
    doctor_base_url: str = arg("", "doctor agent's endpoint (default: --teacher-base-url)", metavar="URL")
    doctor_model_name: str = arg("", "doctor agent's model (default: --teacher-model-name)", metavar="NAME")
    doctor_api_key: str | None = arg(None, "doctor agent's API key (default: --teacher-api-key)")


@dataclass
class PolishConfig(EndpointConfig):
    """python distill.py polish: rewrite real doctors' replies, keeping their medical content."""
    data: list[str] = arg([], "schema JSONL rows with real doctors' replies", metavar="FILE", old=("--in",))
    limit: int = arg(0, "polish only the first N rows (0: all)", bounds="[0, inf)")
    on_flag: str = arg("original", "a rewrite that changed drug names or numbers: use the doctor's original "
                       "reply instead, keep the rewrite (row marked flagged), or drop the row",
                       choices=("original", "keep", "drop"))
    temperature: float = arg(0.3, "sampling temperature of the rewrites", bounds="[0, inf)")


# ---------------------------------------------------------------- shared plumbing


def _check_endpoint(cfg: EndpointConfig) -> None:
    if not cfg.out:
        raise UserError("pass --out FILE (the JSONL file to write)")
    if Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a directory; give a file name")
    if cfg.concurrency < 1 or cfg.attempts < 1 or cfg.max_new_tokens < 1:
        raise UserError("--concurrency, --attempts and --max-new-tokens must be at least 1")


def cache_path(cfg: EndpointConfig, suffix: str = "") -> str | None:
    """The SQLite cache file: --cache, or <out>.cache.sqlite; 'none' turns caching off."""
    path = cache_file(cfg.cache, f"{cfg.out}.cache.sqlite")
    if path and suffix:  # one file per endpoint when two are used
        p = Path(path)
        path = str(p.with_name(f"{p.stem}.{suffix}{p.suffix}"))
    return path


def teacher(cfg: EndpointConfig, name: str, base_url: str = "", model_name: str = "",
            api_key: str | None = None, cache_suffix: str = "") -> LLM:
    """The LLM client of one agent: the teacher's endpoint unless another is given."""
    return from_flags(cfg, "teacher", cache=cache_path(cfg, cache_suffix), name=name, base_url=base_url,
                      model_name=model_name, api_key=api_key)


def _report(command: str, out: str, rows: int, kept: int, dropped: Counter, llms: list, **extra) -> dict:
    """The summary every command prints and returns."""
    usage = [llm.usage for llm in llms]
    report = {"command": command, "out": out, "rows": rows, "kept": kept,
              "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
              "requests": sum(u.requests for u in usage), "cached": sum(u.cached for u in usage),
              "prompt_tokens": sum(u.prompt_tokens for u in usage),
              "completion_tokens": sum(u.completion_tokens for u in usage),
              "llm": [llm.summary() for llm in llms], **extra}
    for line in report["llm"]:
        print(line)
    extras = "".join(f", {k} {v}" for k, v in extra.items() if isinstance(v, int))
    print(f"{command}: kept {kept}{extras}; wrote {rows} rows to {out}")
    if dropped:
        print("dropped: " + ", ".join(f"{reason} {k}" for reason, k in report["dropped"].items()))
    return report


# ---------------------------------------------------------------- instructions


def load_seeds(path) -> list[dict]:
    """Seed instructions: JSONL rows {"instruction": str, "department"?: str, "role"?: str}."""
    seeds = []
    for lineno, obj in iter_jsonl(path):
        text = obj.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: a seed needs a non-empty 'instruction' string")
        seeds.append({**obj, "instruction": text.strip()})
    if not seeds:
        raise DataError(f"{path}: no seed instructions")
    return seeds


def bundled_seeds() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "distill_seeds.jsonl"


def instruction_request(seeds: list[dict], cfg: InstructionsConfig, i: int) -> dict:
    """Request number i: its sampled focus (department or role) and the chat call. A pure function
    of (seeds, cfg, i), so a rerun asks exactly the same requests and finds them in the cache."""
    rng = random.Random(f"{cfg.seed}-instructions-{i}")
    if rng.random() < cfg.role_share:
        role = rng.choice(sorted(ROLES))
        focus, label = FOCUS_ROLE.format(role=role, hint=ROLES[role]), {"role": role}
    else:
        department = rng.choice(DEPARTMENTS)
        focus, label = FOCUS_DEPARTMENT.format(department=department), {"department": department}
    shown = rng.sample(seeds, min(cfg.examples, len(seeds)))
    examples = "\n".join(f"{k}. {s['instruction']}" for k, s in enumerate(shown, 1))
    prompt = INSTRUCTION_PROMPT.format(examples=examples, n=cfg.per_request, focus=focus)
    call = {"messages": [{"role": "user", "content": prompt}], "temperature": cfg.instruction_temperature,
            "max_tokens": cfg.max_new_tokens, "seed": cfg.seed * 1_000_003 + i}
    return {"label": label, "call": call}


def run_instructions(cfg: InstructionsConfig) -> dict:
    """Self-instruct: generate, filter and deduplicate instructions, answer them, write the rows."""
    _check_endpoint(cfg)
    if cfg.limit < 1 or cfg.per_request < 1 or cfg.examples < 1:
        raise UserError("--limit, --per-request and --examples must be at least 1")
    if not 0 <= cfg.role_share <= 1:
        raise UserError(f"--role-share must be between 0 and 1, got {cfg.role_share}")
    if not 0 <= cfg.rouge < 1:
        raise UserError(f"--rouge must be in [0, 1) (a higher ROUGE-L drops an instruction), got {cfg.rouge}")
    seeds_path = cfg.seeds or bundled_seeds()
    if not Path(seeds_path).is_file():
        raise UserError(f"--seeds {seeds_path}: no such file")
    seeds = load_seeds(seeds_path)
    max_requests = cfg.max_requests or 4 * math.ceil(cfg.limit / cfg.per_request) + 10
    with teacher(cfg, "instructions") as llm:
        index = RougeIndex(cfg.rouge)
        for s in seeds:  # a copy of a seed is a near-duplicate too
            index.add(s["instruction"])
        kept, dropped, asked = [], Counter(), 0
        while len(kept) < cfg.limit and asked < max_requests:
            # rounds sized by what is still missing: deterministic, so a rerun replays the cache
            k = min(max_requests - asked, math.ceil((cfg.limit - len(kept)) / cfg.per_request))
            requests = [instruction_request(seeds, cfg, i) for i in range(asked, asked + k)]
            answers = llm.map([r["call"] for r in requests], parse=parse_instructions,
                              followup=nudge("instructions"), desc=f"instructions {len(kept)}/{cfg.limit}")
            asked += k
            for request, answer in zip(requests, answers):
                if not answer.ok:
                    dropped[f"generation reply unusable ({answer.error})"] += 1
                    continue
                for text in answer.value:
                    if len(kept) == cfg.limit:
                        break
                    reason = instruction_problem(text, cfg.min_chars, cfg.max_chars)
                    if reason is None and index.match(text) is not None:
                        reason = f"near-duplicate (ROUGE-L > {cfg.rouge:g})"
                    if reason:
                        dropped[reason] += 1
                        continue
                    index.add(text)
                    kept.append({"instruction": text, **request["label"]})
        if len(kept) < cfg.limit:
            print(f"warning: kept {len(kept)} of {cfg.limit} instructions after {asked} requests "
                  f"(--max-requests {max_requests}); raise it or lower --limit", file=sys.stderr)
        calls = [{"messages": [{"role": "system", "content": ANSWER_SYSTEM},
                               {"role": "user", "content": item["instruction"]}],
                  "temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens} for item in kept]
        answers = llm.map(calls, parse=parse_answer, followup=nudge("answer"), desc="answers")
        rows = []
        for k, (item, answer) in enumerate(zip(kept, answers), 1):
            if not answer.ok:
                dropped[f"answer unusable ({answer.error})"] += 1
                continue
            row = {"id": f"distill-di-{cfg.seed}-{k:05d}",
                   "messages": [{"role": "user", "content": item["instruction"]},
                                {"role": "assistant", "content": answer.value}],
                   "source": "distilled_instructions"}
            row.update({key: item[key] for key in ("department", "role") if key in item})
            rows.append(validate(row, f"instruction {k}"))
        write_jsonl(cfg.out, rows)
        return _report("instructions", cfg.out, len(rows), len(kept), dropped, [llm],
                       generation_requests=asked, rouge_checks=index.checked)


# ---------------------------------------------------------------- conversations


def patient_messages(case: dict, turns: list[dict]) -> list[dict]:
    """The patient agent's view: the case in its system prompt, the doctor's turns as 'user'."""
    msgs = [{"role": "system", "content": PATIENT_SYSTEM.format(case=case["medical_case"].strip(), end=END_MARK)},
            {"role": "user", "content": PATIENT_START}]
    for t in turns:
        msgs.append({"role": "assistant" if t["role"] == "user" else "user", "content": t["content"]})
    return msgs


def doctor_messages(case: dict, turns: list[dict]) -> list[dict]:
    """The doctor agent's view: the real doctor's conclusion as a hint, the patient's turns as 'user'."""
    diagnosis, department = case["doctor_diagnosis"].strip(), case["department"].strip()
    reference = DOCTOR_REFERENCE.format(reference=diagnosis) if diagnosis else ""
    system = DOCTOR_SYSTEM.format(department=department or "全科", reference=reference, end=END_MARK)
    return [{"role": "system", "content": system}] + [dict(t) for t in turns]


def run_conversations(cfg: ConversationsConfig) -> dict:
    """Two agents per case, all cases advancing one turn at a time (one map per turn, so the
    endpoint sees up to --concurrency conversations at once); rows for finished conversations. A
    turn still unusable after its re-asks drops its whole conversation (counted by reason)."""
    _check_endpoint(cfg)
    if not cfg.data:
        raise UserError("pass --data FILE [FILE ...] (schema rows or Med-dialog cases)")
    if cfg.max_turns < 1:
        raise UserError("--max-turns must be at least 1")
    cases = load_cases(cfg.data, cfg.limit, strict=False)
    if not cases:
        raise UserError(f"--data {' '.join(cfg.data)}: no cases")
    patient_ep = (cfg.patient_base_url or cfg.teacher_base_url, cfg.patient_model_name or cfg.teacher_model_name,
                  cfg.patient_api_key if cfg.patient_api_key is not None else cfg.teacher_api_key)
    doctor_ep = (cfg.doctor_base_url or cfg.teacher_base_url, cfg.doctor_model_name or cfg.teacher_model_name,
                 cfg.doctor_api_key if cfg.doctor_api_key is not None else cfg.teacher_api_key)
    if patient_ep == doctor_ep:
        patient = doctor = teacher(cfg, "conversations", *patient_ep)
    else:
        patient = teacher(cfg, "patient", *patient_ep, cache_suffix="patient")
        doctor = teacher(cfg, "doctor", *doctor_ep, cache_suffix="doctor")
    llms = [patient] if patient is doctor else [patient, doctor]
    try:
        turns = {i: [] for i in range(len(cases))}
        stop, dropped = {}, Counter()
        active = list(range(len(cases)))
        params = {"temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens}
        for turn in range(1, cfg.max_turns + 1):
            replies = patient.map([{"messages": patient_messages(cases[i], turns[i]), **params} for i in active],
                                  parse=parse_patient, followup=nudge("turn"), desc=f"patient turn {turn}")
            speaking = []
            for i, a in zip(active, replies):
                if not a.ok:
                    dropped[f"patient turn unusable ({a.error})"] += 1
                    continue
                said, ended = a.value
                if ended and turns[i]:  # the patient has no more questions: the last doctor turn ends it
                    stop[i] = "patient_end"
                    continue
                if not said:
                    dropped["patient ended before speaking"] += 1
                    continue
                turns[i].append({"role": "user", "content": said})
                speaking.append(i)
            replies = doctor.map([{"messages": doctor_messages(cases[i], turns[i]), **params} for i in speaking],
                                 parse=parse_doctor, followup=nudge("turn"), desc=f"doctor turn {turn}")
            active = []
            for i, a in zip(speaking, replies):
                if not a.ok:
                    dropped[f"doctor turn unusable ({a.error})"] += 1
                    continue  # the whole conversation is dropped: it is never given a stop reason
                said, ended = a.value
                turns[i].append({"role": "assistant", "content": said})
                if ended:
                    stop[i] = "doctor_end"
                else:
                    active.append(i)
            for i in active if turn == cfg.max_turns else ():
                stop[i] = "max_turns"
            if not active:
                break
        rows = []
        for i in sorted(stop):
            if not turns[i]:
                continue
            case = cases[i]
            row = {"id": f"distill-dc-{case['id']}", "messages": turns[i], "source": "distilled_conversations",
                   "case_id": case["id"], "stop": stop[i]}
            if case["department"].strip():
                row["department"] = case["department"].strip()
            rows.append(validate(row, f"case {case['id']}"))
        stops = Counter(r["stop"] for r in rows)
        return _report("conversations", cfg.out, write_jsonl(cfg.out, rows), len(rows), dropped, llms,
                       **{f"stop_{k}": v for k, v in sorted(stops.items())})
    finally:
        for llm in llms:
            llm.close()


# ---------------------------------------------------------------- polish


def _dialogue(messages: list[dict]) -> str:
    return "\n".join(("患者：" if m["role"] == "user" else "医生：") + m["content"]
                     for m in messages if m["role"] != "system")


def polish_call(messages: list[dict], k: int, cfg: PolishConfig) -> dict:
    """The rewrite request for the doctor turn messages[k], with the dialogue before it as context."""
    context = POLISH_CONTEXT.format(dialogue=_dialogue(messages[:k])) if k else ""
    prompt = POLISH_PROMPT.format(context=context, reply=messages[k]["content"])
    return {"messages": [{"role": "user", "content": prompt}], "temperature": cfg.temperature,
            "max_tokens": cfg.max_new_tokens}


def run_polish(cfg: PolishConfig) -> dict:
    """Rewrite every doctor turn of every row; keep the original beside it; flag lost facts."""
    _check_endpoint(cfg)
    if not cfg.data:
        raise UserError("pass --data FILE [FILE ...] (schema rows with real doctors' replies)")
    rows = []
    for path in cfg.data:
        rows.extend(validate(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path))
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise UserError(f"--data {' '.join(cfg.data)}: no rows")
    jobs = [(r, k) for r, row in enumerate(rows) for k, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    with teacher(cfg, "polish") as llm:
        answers = llm.map([polish_call(rows[r]["messages"], k, cfg) for r, k in jobs], parse=parse_polished,
                          followup=nudge("polish"), desc="polish")
        by_row: dict[int, dict[int, object]] = {}
        for (r, k), a in zip(jobs, answers):
            by_row.setdefault(r, {})[k] = a
        out, dropped, flagged_rows, flagged_turns = [], Counter(), 0, 0
        for r, row in enumerate(rows):
            got = by_row[r]
            bad = next((a for a in got.values() if not a.ok), None)
            if bad is not None:
                dropped[f"rewrite unusable ({bad.error})"] += 1
                continue
            messages, flagged = [], False
            for k, m in enumerate(row["messages"]):
                if k not in got:
                    messages.append(dict(m))
                    continue
                check = fact_check(m["content"], got[k].value)
                msg = {"role": "assistant", "content": got[k].value, "original": m["content"]}
                if check["missing"] or check["added"]:
                    flagged, flagged_turns = True, flagged_turns + 1
                    msg["flag"] = check
                    if cfg.on_flag == "original":
                        msg.update(content=m["content"], rewrite=got[k].value)
                messages.append(msg)
            flagged_rows += flagged
            if flagged and cfg.on_flag == "drop":
                dropped["rewrite changed drug names or numbers"] += 1
                continue
            pairs = sum(m["role"] == "assistant" for m in messages)
            polished = {key: v for key, v in row.items() if key != "messages"}
            polished.update(id=row_id(row), messages=messages,
                            source="real_doctor_instructions" if pairs == 1 else "real_doctor_conversations")
            if flagged and cfg.on_flag == "keep":  # a changed fact is in the row: mix drops it by default
                polished["flagged"] = True
            out.append(validate(polished, f"row {polished['id']}"))
        write_jsonl(cfg.out, out)
        return _report("polish", cfg.out, len(out), len(out), dropped, [llm],
                       flagged_rows=flagged_rows, flagged_turns=flagged_turns)


# ---------------------------------------------------------------- CLI

COMMANDS = {
    "instructions": (InstructionsConfig, run_instructions, "self-instruct: seeds -> new instructions -> answers"),
    "conversations": (ConversationsConfig, run_conversations, "patient and doctor agents on real cases"),
    "polish": (PolishConfig, run_polish, "rewrite real doctors' replies, keeping their medical content"),
}
USAGE = "usage: distill.py {instructions,conversations,polish} [--help] ...\n\n" + "\n".join(
    f"  {name:14s} {doc}" for name, (_, _, doc) in COMMANDS.items())


def command_config(name: str, argv: list[str]):
    """The config of command `name` from its flags, as on the command line (for scripts and tests)."""
    cls, _, doc = COMMANDS[name]
    return parse_config(cls, list(argv), prog=f"distill.py {name}", description=doc)


def main(argv=None) -> int:
    """Entry point of distill.py: the first argument names the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)} (see distill.py --help)",
              file=sys.stderr)
        return 2
    cls, run, doc = COMMANDS[name]
    return cli_main(run, cls, argv[1:], prog=f"distill.py {name}",
                    description=f"{doc}\n\n{__doc__}")


if __name__ == "__main__":
    sys.exit(main())
