"""Judge feedback for RLAIF: rank the SFT model's sampled answers to each prompt.

Holds the judge prompt (HuatuoGPT's criteria: informativeness, coherence,
agreement with human preference and accuracy, with the real doctor's reply as
the reference), a strict parser for the judge's final ranking line,
`OpenAIJudge` (any OpenAI-compatible server: bounded concurrency, retries,
SQLite cache), `OfflineJudge` (similarity to the doctor's reply, no network),
the conversion of rankings into reward-model preference records, and a CLI:

    python -m nanohuatuo.feedback rank --in samples.jsonl --out prefs.jsonl \
        [--judge offline|openai] [--base-url URL --model NAME --api-key KEY \
         --cache FILE --concurrency N --mixed --seed S]

Item (one JSON object per line of the CLI's input):
    {"id": str,
     "question": str | [{"role": "user"|"assistant"|"system", "content": str}, ...],
     "reference": str,          # the real doctor's reply
     "answers": [str, ...]}     # K answers sampled from the SFT model

Judge result per item:
    {"id": str, "ranking": [int, ...] | None, "raw": str, "cached": bool}
    `ranking` holds indices into `answers`, best first, and is always a
    permutation of all of them; None means the judge gave no usable ranking
    (`raw` keeps the judge's last reply for inspection, "error" says why when a
    request was rejected). `cached` is True when every call was served from
    the cache.
    mixed=True (HuatuoGPT's mixed feedback) makes the doctor's reply one more
    candidate: `ranking` then indexes answers + [reference], index K
    (= len(answers)) is the doctor's reply, and the result also has
    "reference_rank", the doctor's 0-based place (0 = best) or None.

Judge reply format (stated in the prompt, checked by `parse_ranking`):
    brief reasoning, then a final line with the candidate numbers as shown,
    best first, each exactly once:
        排名：3 > 1 > 2
    A JSON object {"ranking": [3, 1, 2]} is accepted too, as are full-width
    characters (＞ ： ，), code fences, markdown bold, "回答3"-style labels and
    "," or "、" instead of ">". Ties ("=") are not supported: they yield None.

Preference record (what `rankings_to_preferences` returns, one per usable item):
    {"id", "prompt": <question str or messages>, "reference", "answers": [best, ..., worst]}
    With mixed feedback the doctor's reply is one of the ranked answers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import re
import sqlite3
import sys
import threading
import time
import unicodedata
from collections import Counter
from pathlib import Path

# ---------------------------------------------------------------- judge prompt

SYSTEM_PROMPT = "你是一名经验丰富、严谨公正的医学专家，负责评估医生对患者问题的回答质量。"

CRITERIA = (
    "1. 信息量：是否给出充分、具体、有用的医学信息和建议；\n"
    "2. 连贯性：表达是否通顺、有条理，与对话上下文衔接自然；\n"
    "3. 符合人类偏好：是否像一位耐心、专业、有同理心的医生，必要时主动询问病情；\n"
    "4. 准确性：医学内容是否正确、安全，不误导患者。"
)

ROLE_NAMES = {"user": "患者", "assistant": "医生", "system": "背景"}


def candidates(item: dict, mixed: bool = False) -> list[str]:
    """The texts the judge ranks: the sampled answers, plus the doctor's reply when mixed."""
    return list(item["answers"]) + ([item["reference"]] if mixed else [])


def candidate_order(item_id: str, n: int, seed: int = 0) -> list[int]:
    """Seeded per-item shuffle: order[j] is the candidate shown to the judge as number j + 1."""
    order = list(range(n))
    # a fresh shuffle per item spreads the judge's position bias evenly over the candidates
    random.Random(f"{seed}:{item_id}").shuffle(order)
    return order


def format_dialogue(question) -> str:
    """Render a question string or a multi-turn messages list as 患者/医生 lines."""
    if isinstance(question, str):
        return f"患者：{question.strip()}"
    return "\n".join(f"{ROLE_NAMES.get(turn['role'], turn['role'])}：{turn['content'].strip()}"
                     for turn in question)


def build_judge_messages(item: dict, order: list[int], mixed: bool = False) -> list[dict]:
    """Chat messages asking the judge to rank the candidates, shown in `order`."""
    cands = candidates(item, mixed)
    n = len(cands)
    parts = [
        f"下面是一段医患对话，以及针对患者最后一个问题的{n}个候选回答。"
        f"请按以下标准，把这{n}个候选回答从好到差排名：\n{CRITERIA}",
        f"【对话】\n{format_dialogue(item['question'])}",
    ]
    if mixed:
        # the doctor's reply is a hidden candidate here; showing it as the reference too
        # would let the judge spot it by exact match instead of judging it
        parts.append("请依据你的医学知识判断各回答的准确性。")
    else:
        parts.append(
            f"【真实医生的回复（参考）】\n{item['reference'].strip()}\n"
            "请把每个候选回答与真实医生的回复进行比较，以它作为判断准确性和专业性的参考；"
            "不要求措辞一致，比参考更全面、更准确的回答应排得更高。")
    parts += [f"【候选回答{j + 1}】\n{cands[i].strip()}" for j, i in enumerate(order)]
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

_LABEL = re.compile(r"(?:最终排名|排名|排序|ranking)\s*(?:结果)?\s*:\s*(?P<body>[^\n]*)", re.IGNORECASE)
_JSON = re.compile(r"\{[^{}]*\}")
_ITEM = r"[\[(【]?\s*(?:候选回答|候选|回答|答案|candidate|answer)?\s*#?\s*\d+\s*[\])】]?"
_SEQUENCE = re.compile(rf"{_ITEM}(?:\s*[>,、=]\s*{_ITEM})*", re.IGNORECASE)


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
    numbers = [int(x) for x in re.findall(r"\d+", span)]
    if sorted(numbers) != list(range(1, n + 1)):
        return None
    return [x - 1 for x in numbers]


def parse_ranking(text: str, n: int) -> list[int] | None:
    """Positions (0-based, as numbered in the prompt) best first, or None.

    Looks at every '排名：…' line and every JSON object with a "ranking" key,
    takes the last one that looks like a ranking and accepts it only if it is
    a permutation of all n candidates; it never falls back to an earlier one.
    """
    # NFKC turns full-width ＞ ： ， and digits into ASCII; fences and bold are decoration
    text = unicodedata.normalize("NFKC", text or "").replace("`", "").replace("*", "")
    found = []  # (position, sequence text or list of numbers)
    for match in _LABEL.finditer(text):
        if _SEQUENCE.match(match.group("body").strip()):
            found.append((match.start(), match.group("body")))
    for match in _JSON.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "ranking" in obj:
            found.append((match.start(), obj["ranking"]))
    if not found:
        return None
    _, value = max(found, key=lambda pair: pair[0])
    if isinstance(value, str):
        return _parse_sequence(value, n)
    if not isinstance(value, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) or isinstance(x, str) and x.strip().isdigit()
            for x in value):
        return None
    return _parse_sequence(" > ".join(str(x).strip() for x in value), n)


# ------------------------------------------------------------- item checking

def check_item(item: dict, mixed: bool = False) -> None:
    """Raise ValueError naming the item and field when an item is malformed."""
    where = f"nanohuatuo/feedback.py: item {item.get('id')!r}" if isinstance(item, dict) else \
        "nanohuatuo/feedback.py: an item"
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        raise ValueError(f"{where} needs a string 'id'; fix the input items")
    question = item.get("question")
    if not (isinstance(question, str) or isinstance(question, list) and question and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in question)):
        raise ValueError(f"{where}: 'question' must be a string or a non-empty list of "
                         "{'role', 'content'} messages; fix the input items")
    if not isinstance(item.get("reference"), str) or not item["reference"].strip():
        raise ValueError(f"{where}: 'reference' must be the doctor's reply as a non-empty string")
    answers = item.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a list of strings")
    if len(answers) + mixed < 2:
        raise ValueError(f"{where}: needs at least 2 candidates to rank, got {len(answers) + mixed}; "
                         "sample more answers per prompt")


def _result(item: dict, ranking: list[int] | None, raw: str, cached: bool, mixed: bool) -> dict:
    result = {"id": item["id"], "ranking": ranking, "raw": raw, "cached": cached}
    if mixed:
        k = len(item["answers"])
        result["reference_rank"] = ranking.index(k) if ranking is not None else None
    return result


# ---------------------------------------------------------------- OpenAI judge

class JudgeError(RuntimeError):
    """A judge failure that retrying cannot fix: bad key, unknown model, server gone."""


RETRY_STATUS = {408, 409, 429}  # and every 5xx


def request_key(base_url: str, model: str, messages: list[dict], params: dict) -> str:
    """Cache key: hash of everything that determines the judge's reply."""
    blob = json.dumps({"base_url": base_url, "model": model, "messages": messages, "params": params},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def retry_after_seconds(headers) -> float | None:
    """Seconds the server asked us to wait (Retry-After / retry-after-ms), or None."""
    try:
        return max(0.0, float(headers.get("retry-after-ms")) / 1000)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAIJudge:
    """Ranks answers with an LLM behind an OpenAI-compatible chat completions API.

    Every successful call is stored in a SQLite cache (cache_path=None turns it
    off), so an interrupted or repeated run re-sends nothing it already has.
    Transient failures (429, 408, 409, 5xx, timeouts, connection errors) are
    retried up to max_retries times with capped exponential backoff and jitter,
    or after the server's Retry-After; a 400/422 makes that item unusable; a bad
    key or unknown model raises JudgeError at once. A reply without a valid
    ranking is followed up with a nudge, up to parse_attempts replies in all.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 cache_path: str | Path | None = "runs/judge_cache.sqlite", concurrency: int = 4,
                 timeout: float = 60.0, max_retries: int = 5, temperature: float = 0.0,
                 max_tokens: int = 1024, parse_attempts: int = 3, base_delay: float = 1.0,
                 max_delay: float = 60.0, seed: int = 0, progress_every: float = 5.0):
        import openai  # only the networked judge needs the client; the offline path runs without it

        self.base_url = (base_url or os.environ.get("NANOHUATUO_JUDGE_BASE_URL")
                         or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        self.model = model or os.environ.get("NANOHUATUO_JUDGE_MODEL")
        if not self.model:
            raise JudgeError("nanohuatuo/feedback.py: no judge model given; pass --model (model=...) "
                             "or set NANOHUATUO_JUDGE_MODEL, or use --judge offline")
        # local servers (vLLM, llama.cpp) ignore the key but the client insists on one
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self._openai = openai
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.parse_attempts = parse_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.seed = seed
        self.progress_every = progress_every
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._db = None
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            # one connection shared by the worker threads, serialised by self._lock
            self._db = sqlite3.connect(self.cache_path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                             "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
                             "created REAL NOT NULL)")
            self._db.commit()
        self.stats = {}

    def close(self) -> None:
        # under the lock: after an error, rank() returns while running workers may still finish a
        # request and touch the cache; they find it gone instead of using a closed connection
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one chat completion, from the cache or the server

    def _complete(self, messages: list[dict]) -> tuple[str, bool]:
        key = request_key(self.base_url, self.model, messages, self.params)
        with self._lock:
            row = None if self._db is None else \
                self._db.execute("SELECT text FROM responses WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self._count(cache_hits=1)
            return row[0], True
        text, prompt_tokens, completion_tokens = self._request(messages)
        with self._lock:
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                                 (key, text, prompt_tokens, completion_tokens, time.time()))
                # a commit per row so an interrupted run keeps everything it paid for
                self._db.commit()
        self._count(requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return text, False

    def _request(self, messages: list[dict]) -> tuple[str, int, int]:
        openai = self._openai
        for attempt in range(self.max_retries + 1):
            try:
                response = self._client.chat.completions.create(model=self.model, messages=messages,
                                                                **self.params)
                usage = response.usage
                return (response.choices[0].message.content or "",
                        usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise JudgeError(f"nanohuatuo/feedback.py: the judge server at {self.base_url} rejected the "
                                 f"API key ({e.status_code}); check --api-key / OPENAI_API_KEY") from e
            except openai.NotFoundError as e:
                raise JudgeError(f"nanohuatuo/feedback.py: {self.base_url} answered 404 for model "
                                 f"{self.model!r}; check --base-url (usually ends in /v1) and --model") from e
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    raise  # 400/422: this request is wrong, resending it cannot help
                error, wait = e, retry_after_seconds(e.response.headers)
            except openai.APIConnectionError as e:  # includes APITimeoutError
                error, wait = e, None
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = min(self.max_delay, self.base_delay * 2 ** attempt) * (0.5 + 0.5 * self._rng.random())
            self._count(retries=1)
            time.sleep(min(wait, self.max_delay))
        where = f"; finished calls are cached in {self.cache_path}, rerun to resume" if self._db else ""
        raise JudgeError(f"nanohuatuo/feedback.py: judge request to {self.base_url} failed after "
                         f"{self.max_retries + 1} attempts ({error!r}){where}") from error

    # -- one item: shuffle, ask, parse, nudge, map back

    def _rank_one(self, item: dict, mixed: bool) -> dict:
        n = len(item["answers"]) + mixed
        order = candidate_order(item["id"], n, self.seed)
        messages = build_judge_messages(item, order, mixed)
        raw, all_cached = "", True
        for _ in range(self.parse_attempts):
            try:
                raw, cached = self._complete(messages)
            except self._openai.APIStatusError as e:  # only 400-like errors get here
                result = _result(item, None, raw, False, mixed)
                result["error"] = f"request rejected ({e.status_code}): {e.message}"
                return result
            all_cached = all_cached and cached
            shown = parse_ranking(raw, n)
            if shown is not None:
                return _result(item, [order[p] for p in shown], raw, all_cached, mixed)
            # nudge rather than resend: at temperature 0 the same request returns the same text
            messages = messages + [{"role": "assistant", "content": raw}, nudge_message(n)]
        return _result(item, None, raw, all_cached, mixed)

    def _count(self, **deltas) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.stats[name] = self.stats.get(name, 0) + delta

    def _report(self) -> None:
        s = self.stats
        print(f"judge: {s['done']}/{s['total']} done, {s['cache_hits']} cache hits, {s['unusable']} unusable, "
              f"{s['requests']} requests ({s['retries']} retries), tokens {s['prompt_tokens']} prompt + "
              f"{s['completion_tokens']} completion", file=sys.stderr, flush=True)

    def rank(self, items: list[dict], mixed: bool = False) -> list[dict]:
        """Judge every item; results come back in item order (see the module docstring)."""
        for item in items:
            check_item(item, mixed)
        self.stats = dict.fromkeys(["done", "cache_hits", "unusable", "requests", "retries",
                                    "prompt_tokens", "completion_tokens"], 0)
        self.stats["total"] = len(items)
        results = [None] * len(items)
        last_report = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self._rank_one, item, mixed): i for i, item in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                result = results[futures[future]] = future.result()
                self._count(done=1, unusable=result["ranking"] is None)
                if time.monotonic() - last_report >= self.progress_every:
                    self._report()
                    last_report = time.monotonic()
        finally:
            # on an error or Ctrl-C, drop queued items instead of waiting for them
            pool.shutdown(wait=False, cancel_futures=True)
        self._report()
        return results


# --------------------------------------------------------------- offline judge

REPETITION_WEIGHT = 0.5  # 1 - distinct/total bigrams is ~0.1 for normal text, ~1 for loops
LENGTH_WEIGHT = 0.1      # times |len(answer) - len(reference)| / len(reference), capped at 1


def _bigrams(text: str) -> tuple[Counter, int]:
    chars = "".join(unicodedata.normalize("NFKC", text).split())
    return Counter(chars[i:i + 2] for i in range(len(chars) - 1)), len(chars)


def offline_score(answer: str, reference: str) -> float:
    """Character-bigram F1 against the reference, minus repetition and length penalties.

    score = F1 - REPETITION_WEIGHT * (1 - distinct bigrams / bigrams)
               - LENGTH_WEIGHT * min(1, |len(answer) - len(reference)| / len(reference))
    Lengths count characters without whitespace.
    """
    a, a_len = _bigrams(answer)
    r, r_len = _bigrams(reference)
    a_total, r_total = sum(a.values()), sum(r.values())
    overlap = sum((a & r).values())
    f1 = 2 * overlap / (a_total + r_total) if overlap else 0.0
    repetition = 1 - len(a) / a_total if a_total else 0.0
    length_gap = min(1.0, abs(a_len - r_len) / max(r_len, 1))
    return f1 - REPETITION_WEIGHT * repetition - LENGTH_WEIGHT * length_gap


class OfflineJudge:
    """Ranks answers by `offline_score` against the doctor's reply; no network, deterministic.

    Ties go to the lower answer index. With mixed=True the doctor's reply is a
    candidate too and, matching itself, always ranks first.
    """

    def rank(self, items: list[dict], mixed: bool = False) -> list[dict]:
        results = []
        for item in items:
            check_item(item, mixed)
            scores = [offline_score(c, item["reference"]) for c in candidates(item, mixed)]
            ranking = sorted(range(len(scores)), key=lambda i: (-round(scores[i], 12), i))
            raw = "offline scores: " + json.dumps([round(s, 4) for s in scores])
            results.append(_result(item, ranking, raw, False, mixed))
        return results


# ------------------------------------------------------------ preference data

def rankings_to_preferences(items: list[dict], results: list[dict]) -> list[dict]:
    """Preference records (answers best first) for every usable ranking; unusable ones are dropped.

    `results` must be what a judge's rank(items) returned: same length and order.
    """
    if len(items) != len(results):
        raise ValueError(f"nanohuatuo/feedback.py: {len(items)} items but {len(results)} judge results; "
                         "pass the results of judge.rank(items) for the same items")
    records, dropped = [], 0
    for item, result in zip(items, results):
        if result["id"] != item["id"]:
            raise ValueError(f"nanohuatuo/feedback.py: result {result['id']!r} does not match item "
                             f"{item['id']!r}; keep results in the order rank() returned them")
        ranking = result["ranking"]
        if ranking is None:
            dropped += 1
            continue
        k = len(item["answers"])
        if len(ranking) not in (k, k + 1) or sorted(ranking) != list(range(len(ranking))):
            raise ValueError(f"nanohuatuo/feedback.py: item {item['id']!r}: ranking {ranking} is not a "
                             f"permutation of its {k} answers (or {k + 1} with the reference)")
        cands = candidates(item, mixed=len(ranking) == k + 1)
        records.append({"id": item["id"], "prompt": item["question"], "reference": item["reference"],
                        "answers": [cands[i] for i in ranking]})
    print(f"feedback: kept {len(records)} preference records, dropped {dropped} unusable rankings",
          file=sys.stderr)
    return records


# ----------------------------------------------------------------------- CLI

def _read_items(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise SystemExit(f"nanohuatuo/feedback.py: input {path} not found; pass --in a JSONL file of "
                         "{id, question, reference, answers} items")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"nanohuatuo/feedback.py: {path}:{line_no} is not valid JSON ({e}); "
                                 "fix or remove that line") from e
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanohuatuo.feedback",
                                     description="Rank sampled answers with a judge and write preference data.")
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", help="rank the answers of each item, write preference records")
    rank.add_argument("--in", dest="input", required=True, help="JSONL of {id, question, reference, answers}")
    rank.add_argument("--out", required=True, help="JSONL of preference records to write")
    rank.add_argument("--judge", choices=["offline", "openai"], default="openai")
    rank.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $NANOHUATUO_JUDGE_BASE_URL, "
                                         "$OPENAI_BASE_URL, then api.openai.com)")
    rank.add_argument("--model", help="judge model (default: $NANOHUATUO_JUDGE_MODEL)")
    rank.add_argument("--api-key", help="default: $OPENAI_API_KEY, else 'EMPTY' for local servers")
    rank.add_argument("--cache", default="runs/judge_cache.sqlite", help="SQLite cache of judge replies")
    rank.add_argument("--concurrency", type=int, default=4)
    rank.add_argument("--timeout", type=float, default=60.0)
    rank.add_argument("--max-retries", type=int, default=5)
    rank.add_argument("--mixed", action="store_true", help="rank the doctor's reply among the answers")
    rank.add_argument("--seed", type=int, default=0, help="seed of the per-item answer shuffle")
    args = parser.parse_args(argv)

    items = _read_items(args.input)
    try:
        if args.judge == "offline":
            results = OfflineJudge().rank(items, mixed=args.mixed)
        else:
            with OpenAIJudge(base_url=args.base_url, model=args.model, api_key=args.api_key,
                             cache_path=args.cache, concurrency=args.concurrency, timeout=args.timeout,
                             max_retries=args.max_retries, seed=args.seed) as judge:
                results = judge.rank(items, mixed=args.mixed)
    except (JudgeError, ValueError) as e:
        raise SystemExit(str(e)) from e
    records = rankings_to_preferences(items, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"feedback: wrote {len(records)} records to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
