"""The judge's ranking question, one layer below the stages that ask it: the feedback stage (rank
the SFT model's K answers into preference pairs) and GRPO's endpoint reward (rank the policy's K
answers to a prompt, the rank becoming each answer's score).

    messages = build_judge_messages(item, order, mixed=False)   # item: {"question", "reference", "answers"}
    ranking = parse_ranking(reply_text, n)                       # positions best first, or None
    parse = ranking_parser(n)                                    # the same for llm.LLM: ValueError(NO_RANKING)

The prompt holds HuatuoGPT's criteria (informativeness, coherence, agreement with human
preference, accuracy) with the real doctor's reply as the reference; the reply format and the
label variants the parser accepts are described in feedback.py's module docstring.
"""

import json
import random
import re
import unicodedata

# ---------------------------------------------------------------- judge prompt

SYSTEM_PROMPT = "你是一名经验丰富、严谨公正的医学专家，负责评估医生对患者问题的回答质量。"

RANKING_CRITERIA = (
    "1. 信息量：是否给出充分、具体、有用的医学信息和建议；\n"
    "2. 连贯性：表达是否通顺、有条理，与对话上下文衔接自然；\n"
    "3. 符合人类偏好：是否像一位耐心、专业、有同理心的医生，必要时主动询问病情；\n"
    "4. 准确性：医学内容是否正确、安全，不误导患者。"
)

ROLE_NAMES = {"user": "患者", "assistant": "医生", "system": "背景"}


def ranked_texts(item: dict, mixed: bool = False) -> list[str]:
    """The texts the judge ranks: the sampled answers, plus the doctor's reply when mixed."""
    return list(item["answers"]) + ([item["reference"]] if mixed else [])


def shown_order(item_id: str, n: int, seed: int = 0) -> list[int]:
    """Seeded per-item shuffle: order[j] is the answer shown to the judge as number j + 1."""
    order = list(range(n))
    # a fresh shuffle per item spreads the judge's position bias evenly over the answers
    random.Random(f"{seed}:{item_id}").shuffle(order)
    return order


def format_dialogue(question) -> str:
    """Render a question string or a multi-turn messages list as 患者/医生 lines."""
    if isinstance(question, str):
        return f"患者：{question.strip()}"
    return "\n".join(f"{ROLE_NAMES.get(turn['role'], turn['role'])}：{turn['content'].strip()}"
                     for turn in question)


def build_judge_messages(item: dict, order: list[int], mixed: bool = False) -> list[dict]:
    """Chat messages asking the judge to rank the answers, shown in `order`."""
    texts = ranked_texts(item, mixed)
    n = len(texts)
    parts = [
        f"下面是一段医患对话，以及针对患者最后一个问题的{n}个候选回答。"
        f"请按以下标准，把这{n}个候选回答从好到差排名：\n{RANKING_CRITERIA}",
        f"【对话】\n{format_dialogue(item['question'])}",
    ]
    if mixed:
        # the doctor's reply is a hidden answer here; showing it as the reference too
        # would let the judge spot it by exact match instead of judging it
        parts.append("请依据你的医学知识判断各回答的准确性。")
    else:
        parts.append(
            f"【真实医生的回复（参考）】\n{item['reference'].strip()}\n"
            "请把每个候选回答与真实医生的回复进行比较，以它作为判断准确性和专业性的参考；"
            "不要求措辞一致，比参考更全面、更准确的回答应排得更高。")
    parts += [f"【候选回答{j + 1}】\n{texts[i].strip()}" for j, i in enumerate(order)]
    parts.append(
        f"请先简要说明理由（不超过200字），然后在最后单独一行严格按以下格式给出排名："
        f"使用候选回答的编号，从最好到最差，用 > 分隔，1到{n}每个编号恰好出现一次，不允许并列。\n"
        "排名：编号 > 编号 > …")
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n\n".join(parts)}]


def nudge_message(n: int) -> dict:
    """Follow-up asking again for the ranking line after an unparseable reply."""
    return {"role": "user", "content":
            f"你的回复最后没有给出有效的排名。请只输出一行：排名：编号 > 编号 > …，"
            f"包含1到{n}全部{n}个编号，每个恰好一次，不允许并列。"}


# -------------------------------------------------------------- ranking parser

# 排名：/ 排名为：/ 最终排名如下：/ 排序结果是：/ Final ranking is: ; a label ending its line
# ("最终排名如下：" then the ranking below) takes the next non-empty line as its body
_LABEL = re.compile(r"(?:排名|排序|ranking)[ \t]*(?:结果)?[ \t]*(?:为|是|如下|is)?[ \t]*(?::|(?=\n))[ \t]*"
                    r"(?P<body>[^\n]*)(?=(?:\n\s*(?P<below>[^\n]*))?)", re.IGNORECASE)
_JSON = re.compile(r"\{[^{}]*\}")
_ITEM = r"[\[(【]?\s*(?:候选回答|候选|回答|答案|candidate|answer)?\s*#?\s*\d+\s*[\])】]?"
_SEQUENCE = re.compile(rf"{_ITEM}(?:\s*[>,、=]\s*{_ITEM})*", re.IGNORECASE)
_LABELLED = re.compile(r"候选|回答|答案|candidate|answer", re.IGNORECASE)
_ORDER = re.compile(rf"{_ITEM}(?:\s*>\s*{_ITEM})+", re.IGNORECASE)  # "2 > 1 > 3" anywhere


def _parse_sequence(body: str, n: int) -> list[int] | None:
    """'3 > 1 > 2' -> [2, 0, 1] when it is a full permutation of 1..n, else None."""
    match = _SEQUENCE.match(body.strip())
    if match is None:
        return None
    span = match.group(0)
    separators = set(re.findall(r"[>,、=]", span))
    # ties are unsupported, and mixing '>' with ',' leaves the order ambiguous
    if "=" in separators or (">" in separators and separators & {",", "、"}):
        return None
    # "1、回答2 2、回答1" is a numbered list, not the order 1, 2: a labelled answer after a bare number is ambiguous
    # ("候选回答2 > 3 > 1", the label written once, is not)
    labelled = [bool(_LABELLED.search(item)) for item in re.findall(_ITEM, span, re.IGNORECASE)]
    if not labelled[0] and any(labelled):
        return None
    numbers = [int(x) for x in re.findall(r"\d+", span)]
    if sorted(numbers) != list(range(1, n + 1)):
        return None
    return [x - 1 for x in numbers]


def parse_ranking(text: str, n: int) -> list[int] | None:
    """Positions (0-based, as numbered in the prompt) best first, or None.

    Looks at every '排名：…' line and every JSON object with a "ranking" key,
    takes the last one that looks like a ranking and accepts it only if it is
    a permutation of all n answers shown; it never falls back to an earlier one.
    None too when another full order of the n answers ('2 > 1 > 3') is written after it (the
    labelled one was a draft), or when a labelled answer follows a bare number ('1、回答2 2、回答1',
    a numbered list).
    """
    # NFKC turns full-width ＞ ： ， and digits into ASCII; fences and bold are decoration
    text = unicodedata.normalize("NFKC", text or "").replace("`", "").replace("*", "")
    found = []  # (position, where it ends, sequence text or list of numbers)
    for match in _LABEL.finditer(text):
        below = not match.group("body").strip()
        body = (match.group("below") or "").strip() if below else match.group("body").strip()
        if _SEQUENCE.match(body):
            found.append((match.start(), match.end("below") if below else match.end("body"), body))
    for match in _JSON.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "ranking" in obj:
            found.append((match.start(), match.end(), obj["ranking"]))
    if not found:
        return None
    _, end, value = max(found, key=lambda found: found[0])
    if isinstance(value, list) and all(
            isinstance(x, int) and not isinstance(x, bool) or isinstance(x, str) and x.strip().isdigit()
            for x in value):
        value = " > ".join(str(x).strip() for x in value)
    ranking = _parse_sequence(value, n) if isinstance(value, str) else None
    # an order written after the last ranking found ("初步排名：1 > 2 > 3 ... 最终：2 > 1 > 3"): that one was a
    # draft, and which is meant is not for a parser to guess, so the reply is asked again
    for m in _ORDER.finditer(text, end):  # a restatement of the same order is fine
        numbers = [int(x) - 1 for x in re.findall(r"\d+", m.group(0))]
        if sorted(numbers) == list(range(n)) and numbers != ranking:
            return None
    return ranking


NO_RANKING = "no ranking line"


def ranking_parser(n: int):
    """parse(text) for llm.LLM: positions best first, or ValueError(NO_RANKING)."""
    def parse(text: str) -> list[int]:
        ranking = parse_ranking(text, n)
        if ranking is None:
            raise ValueError(NO_RANKING)
        return ranking
    return parse
