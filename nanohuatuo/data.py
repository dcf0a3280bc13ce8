"""Conversation data for nanohuatuo: the JSONL schema, its validation, converters
from public Chinese medical corpora and other tools' chat formats, source mixing,
held-out splits and RLAIF prompt files. Their command line is prepare.py
(`python data.py {convert,mix,prompts,stats}`).

Schema, one JSON object a line (UTF-8):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "source": str, "department": str (optional), "id": str (optional),
     "references": [str, ...] (optional)}
An optional system message comes first, then user/assistant turns alternate,
starting with user and ending with assistant. `source` names the SFT source;
HuatuoGPT's four are exported as SOURCES, other strings (e.g. "other") are allowed.
`references` holds every doctor's answer to the last question when there are
several (Huatuo-26M, cMedQA2): the reference metrics score against each of them,
while training sees only the last assistant turn.

Converters (each yields schema rows and stops with a DataError naming the file,
the line and the reason at the first malformed record; every row gets an id
"<file stem>-<line>", with "-<k>" added when one record gives several rows):
  - huatuo_sft   HuatuoGPT-sft-data-v1 JSONL {"data": ["问：..", "答：..", ...]}.
                 The "问："/"答：" prefixes (or half-width "问:"/"答:") are stripped.
                 The file does not say where a record came from, so the caller
                 passes `source`; by default one question/answer pair is
                 distilled_instructions and more pairs distilled_conversations.
  - huatuo26m    Huatuo-26M family JSONL {"questions": .., "answers": ..} (also the
                 singular "question"/"answer" keys). Each side is a string or a
                 list; a nested list in questions is a group of paraphrases and
                 its first item is kept. When both sides are lists of the same
                 length above one, they are paired into one row per pair;
                 otherwise the first question is the user turn (the others are
                 paraphrases of it) and the answers are joined by a blank line,
                 each also kept in `references` when there are several.
                 Default source real_doctor_instructions.
  - cmd_csv      Chinese-medical-dialogue-data CSV, header department,title,ask,
                 answer. Read as UTF-8 (BOM allowed) when the bytes decode cleanly
                 as that, else as GB18030 (the corpus' own encoding); `encoding`
                 forces one. The user turn is `ask`, or `title` when `ask` is empty
                 or just "无". Default source real_doctor_instructions.
  - cmd_jsonl    the same corpus as JSONL with keys department,title,question,answer.
  - cmedqa2      cMedQA2 questions.csv (question_id,content) and answers.csv
                 (ans_id,question_id,content) joined on question_id: one row per
                 question with its first answer in file order (every answer in
                 `references` when it has several), or one row per answer with
                 all_answers. Questions without answers are skipped.
  - webmedqa     webMedQA medQA_{train,valid,test}.txt: tab-separated, no header, one answer a
                 line as `id, label, category, question, answer` (the layout of the
                 repository's own sample; the id and the 0/1 label are told apart by
                 value). Each question has one positive answer (label 1) and four
                 negatives, which are other questions' answers sampled for ranking:
                 one row per question with its positive answer (every positive in
                 `references` when several), the category as department; a question
                 without a positive is skipped. Default source real_doctor_instructions.
  - sharegpt, alpaca, openai   the chat shapes of other tools (formats.py), from JSONL, a
                 JSON array, Parquet or a datasets folder; a row's own source is kept,
                 else "other"; `--source` replaces both.
SFT reads all of these shapes directly (load_conversations), so converting them first is only
needed to mix, split or inspect them with this module's commands.
Real doctor replies are kept verbatim (only surrounding whitespace is stripped):
polishing them into fluent answers is an LLM job, out of scope here.

The evaluation sets evaluate.py reads are in evalsets.py, on top of these converters.
"""

import glob
import hashlib
import itertools
import json
import os
import random
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from .formats import DataError, iter_csv, iter_jsonl, iter_records, iter_tsv, shape_of, to_row

SOURCES = (
    "distilled_instructions",
    "real_doctor_instructions",
    "distilled_conversations",
    "real_doctor_conversations",
)
ROLES = ("system", "user", "assistant")
FORMATS = ("huatuo_sft", "huatuo26m", "cmd_csv", "cmd_jsonl", "cmedqa2", "webmedqa", "sharegpt", "alpaca", "openai")
FOREIGN = ("sharegpt", "alpaca", "openai")  # the chat shapes of other tools (formats.py)
WEBMEDQA_LAYOUT = "id, label, category, question, answer"


# ---------------------------------------------------------------- JSONL files


def read_jsonl(path) -> list[dict]:
    """All objects of a JSONL file; blank lines are skipped."""
    return [obj for _, obj in iter_jsonl(path)]


_WRITES = itertools.count()  # this process's temp files, numbered: two threads never share one


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_jsonl(path, rows: Iterable[dict]) -> int:
    """Write rows as UTF-8 JSONL atomically (temp file + os.replace); return the count.

    The file gets the usual permissions (0666 less the umask, as `open` gives), not a temp file's 0600.
    The temp file (.NAME.PID-N.tmp) is this writer's own; one that a killed process left is removed
    by the next write of the same file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{glob.escape(path.name)}.*-*.tmp"):
        pid = old.name[len(path.name) + 2:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{next(_WRITES)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a half-written temp file must not linger next to the real output
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


# ---------------------------------------------------------------- schema


def check_messages(messages, where: str, last: str = "assistant") -> None:
    """Raise DataError('<where>: <reason>') unless `messages` is a non-empty list of {role, non-empty
    content} in the order system? (user assistant)* and ending with a `last` turn."""

    def fail(reason):
        raise DataError(f"{where}: {reason}")

    if not isinstance(messages, list) or not messages:
        fail("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            fail(f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            fail(f"messages[{i}]: bad role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            fail(f"messages[{i}]: content must be a string")
        if not m["content"].strip():
            fail(f"messages[{i}]: empty content")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        fail("no user/assistant turns after the system message")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        got = messages[i]["role"]
        if got != expected:
            if got == "system":
                fail(f"messages[{i}]: system message is only allowed first")
            fail(f"messages[{i}]: broken alternation, expected {expected!r}, got {got!r}")
    if messages[-1]["role"] != last:
        fail(f"conversation must end with {'an assistant' if last == 'assistant' else 'a user'} message")


def split_prompt(row, where: str) -> tuple[list[dict], str | None]:
    """(messages ending with the user turn to answer, reference) of a prompt record {messages,
    reference} or of a conversation ending with an answer, which becomes the reference (None
    without either); DataError('<where>: <reason>') when the row is neither."""
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(f"{where}: expected a prompt record {{\"messages\": [...ending with a user turn], "
                        f"\"reference\": ...}} or a conversation ending with an assistant turn")
    messages, reference = row["messages"], row.get("reference")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        check_messages(messages, where)
        messages, reference = messages[:-1], messages[-1]["content"]
    else:
        check_messages(messages, where, last="user")
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: 'reference' must be a string (the doctor's reply), got {type(reference).__name__}")
    return messages, reference


def validate(row, where: str) -> dict:
    """Check one row against the schema; raise DataError('<where>: <reason>'); return row."""

    def fail(reason):
        raise DataError(f"{where}: {reason}")

    if not isinstance(row, dict):
        fail(f"row must be a JSON object, got {type(row).__name__}")
    if "messages" not in row:
        fail("missing 'messages'")
    check_messages(row["messages"], where)
    if not isinstance(row.get("source"), str) or not row["source"].strip():
        fail("missing or empty 'source'")
    for key in ("department", "id"):
        if key in row and not isinstance(row[key], str):
            fail(f"'{key}' must be a string")
    if "references" in row:
        refs = row["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            fail("'references' must be a non-empty list of non-empty strings")
    return row


def iter_conversations(path, source: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", row) for every record of a file, validated; the place names the row in
    messages later on (a conversation dropped as too long, say). The file may be JSONL, a JSON
    array, Parquet or a datasets folder, and its rows schema rows or OpenAI, ShareGPT or Alpaca
    ones (formats.py), turned into schema rows; `source` for those that carry none."""
    for where, obj in iter_records(path):
        yield where, validate(to_row(obj, where, source), where)


def load_conversations(path, source: str | None = None) -> list[dict]:
    """Read a file of conversations (any format iter_conversations reads), naming file:line on the first bad row."""
    return [row for _, row in iter_conversations(path, source)]


def require_rows(rows: list, path, what: str = "rows"):
    """rows, or a DataError when a file gave none: an empty input is a mistake, not an empty result."""
    if not rows:
        raise DataError(f"{path}: no {what} (the file is empty)")
    return rows


def _single_turn(question: str, answer: str, source: str, department: str, row_id: str, where: str,
                 references: list[str] = ()) -> dict:
    """A validated one-question row; contents lose only their surrounding whitespace. Several
    `references` (every doctor's answer) are kept on the row; one is the answer itself."""
    row = {
        "messages": [
            {"role": "user", "content": question.strip()},
            {"role": "assistant", "content": answer.strip()},
        ],
        "source": source,
    }
    if department and department.strip():
        row["department"] = department.strip()
    row["id"] = row_id
    if len(references) > 1:
        row["references"] = [r.strip() for r in references]
    return validate(row, where)


# ---------------------------------------------------------------- converters

_Q_PREFIXES = ("问：", "问:")
_A_PREFIXES = ("答：", "答:")


def convert_huatuo_sft(path, source: str | None = None) -> Iterator[dict]:
    """HuatuoGPT-sft-data-v1 JSONL -> rows; source defaults by pair count (see module doc)."""
    stem = Path(path).stem
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        data = obj.get("data")
        if not isinstance(data, list) or not data:
            raise DataError(f"{where}: 'data' must be a non-empty list")
        if len(data) % 2:
            raise DataError(f"{where}: 'data' has {len(data)} items, expected question/answer pairs")
        messages = []
        for i, text in enumerate(data):
            if not isinstance(text, str):
                raise DataError(f"{where}: data[{i}] must be a string")
            role, own, other = ("user", _Q_PREFIXES, _A_PREFIXES) if i % 2 == 0 else ("assistant", _A_PREFIXES, _Q_PREFIXES)
            text = text.strip()
            if text.startswith(other):
                raise DataError(f"{where}: data[{i}] starts with {text[:2]!r} but a {role} turn is expected here")
            for prefix in own:
                if text.startswith(prefix):
                    text = text[len(prefix):]
                    break
            messages.append({"role": role, "content": text.strip()})
        default = "distilled_instructions" if len(data) == 2 else "distilled_conversations"
        row = {"messages": messages, "source": source or default, "id": f"{stem}-{lineno}"}
        yield validate(row, where)


def _texts(value, key: str, where: str) -> list[str]:
    """A Huatuo-26M field as a list of strings; a nested list is paraphrases, first kept."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a string or a non-empty list")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, list) and item:
            item = item[0]
        if not isinstance(item, str):
            raise DataError(f"{where}: {key}[{i}] must be a string or a non-empty list of strings")
        out.append(item)
    return out


def convert_huatuo26m(path, source: str | None = None) -> Iterator[dict]:
    """Huatuo-26M family JSONL -> single-turn rows (pairing rules in the module doc)."""
    source = source or "real_doctor_instructions"
    stem = Path(path).stem
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        qkey = "questions" if "questions" in obj else "question"
        akey = "answers" if "answers" in obj else "answer"
        if qkey not in obj or akey not in obj:
            raise DataError(f"{where}: expected keys 'questions' and 'answers'")
        questions = _texts(obj[qkey], qkey, where)
        answers = _texts(obj[akey], akey, where)
        if isinstance(obj[qkey], list) and isinstance(obj[akey], list) and len(questions) == len(answers) > 1:
            for k, (q, a) in enumerate(zip(questions, answers), start=1):
                yield _single_turn(q, a, source, "", f"{stem}-{lineno}-{k}", where)
        else:
            kept = [a for a in answers if a.strip()]
            answer = "\n\n".join(a.strip() for a in kept)
            yield _single_turn(questions[0], answer, source, "", f"{stem}-{lineno}", where, kept)


def _cmd_question(ask: str, title: str) -> str:
    """The user turn of a Chinese-medical-dialogue record: ask, or title when ask is empty/无."""
    return title if ask.strip() in ("", "无") else ask


def convert_cmd_csv(path, source: str | None = None, encoding: str | None = None) -> Iterator[dict]:
    """Chinese-medical-dialogue-data CSV (department,title,ask,answer) -> single-turn rows."""
    source = source or "real_doctor_instructions"
    stem = Path(path).stem
    for line, rec in iter_csv(path, ("department", "title", "ask", "answer"), encoding):
        question = _cmd_question(rec["ask"], rec["title"])
        yield _single_turn(question, rec["answer"], source, rec["department"], f"{stem}-{line}", f"{path}:{line}")


def convert_cmd_jsonl(path, source: str | None = None) -> Iterator[dict]:
    """Chinese-medical-dialogue-data JSONL (department,title,question,answer) -> rows."""
    source = source or "real_doctor_instructions"
    stem = Path(path).stem
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("department", "title", "question", "answer"):
            if not isinstance(obj.get(key, ""), str):
                raise DataError(f"{where}: '{key}' must be a string")
        if "answer" not in obj:
            raise DataError(f"{where}: missing 'answer'")
        question = _cmd_question(obj.get("question", ""), obj.get("title", ""))
        yield _single_turn(question, obj["answer"], source, obj.get("department", ""), f"{stem}-{lineno}", where)


def convert_cmedqa2(questions_path, answers_path, source: str | None = None, all_answers: bool = False,
                    encoding: str | None = None) -> Iterator[dict]:
    """cMedQA2 questions.csv + answers.csv joined on question_id -> single-turn rows."""
    source = source or "real_doctor_instructions"
    questions = {}
    for line, rec in iter_csv(questions_path, ("question_id", "content"), encoding):
        qid = rec["question_id"].strip()
        if qid in questions:
            raise DataError(f"{questions_path}:{line}: duplicate question_id {qid!r}")
        questions[qid] = (rec["content"], f"{questions_path}:{line}")
    answers = defaultdict(list)
    for line, rec in iter_csv(answers_path, ("ans_id", "question_id", "content"), encoding):
        qid = rec["question_id"].strip()
        if qid not in questions:
            raise DataError(f"{answers_path}:{line}: question_id {qid!r} is not in {questions_path}")
        answers[qid].append((rec["ans_id"].strip(), rec["content"], f"{answers_path}:{line}"))
    for qid, (question, qwhere) in questions.items():
        for ans_id, answer, awhere in answers[qid] if all_answers else answers[qid][:1]:
            row_id = f"cmedqa2-{qid}-{ans_id}" if all_answers else f"cmedqa2-{qid}"
            # an empty question is blamed on questions.csv, an empty answer on answers.csv
            where = qwhere if not question.strip() else awhere
            # a question's row keeps all its answers as references for the metrics
            others = [] if all_answers else [a for _, a, _ in answers[qid] if a.strip()]
            yield _single_turn(question, answer, source, "", row_id, where, others)


def convert_webmedqa(path, source: str | None = None, encoding: str | None = None) -> Iterator[dict]:
    """webMedQA text (id, label, category, question, answer a line) -> one row per question."""
    source = source or "real_doctor_instructions"
    questions = {}  # id -> [question, category, where, positive answers], in file order
    for line, fields in iter_tsv(path, 5, WEBMEDQA_LAYOUT, encoding):
        where = f"{path}:{line}"
        # the label (0 or 1) and the id are told apart by value: descriptions of the files differ on their order
        first, second = fields[0].strip(), fields[1].strip()
        label, qid = (first, second) if first in ("0", "1") and second not in ("0", "1") else (second, first)
        if label not in ("0", "1"):
            raise DataError(f"{where}: neither of the first two fields is a 0/1 label ({WEBMEDQA_LAYOUT})")
        _, _, category, question, answer = fields
        entry = questions.setdefault(qid, [question, category, where, []])
        if label == "1" and answer.strip():
            entry[3].append((answer, where))
    for qid, (question, category, qwhere, positives) in questions.items():
        if positives:  # the negatives are other questions' answers, sampled for ranking: never a reply
            answer, where = positives[0]
            yield _single_turn(question, answer, source, category, f"webmedqa-{qid}",
                               qwhere if not question.strip() else where, [a for a, _ in positives])


def convert_foreign(fmt: str, path, source: str | None = None) -> Iterator[dict]:
    """Rows of another tool's chat shape (sharegpt, alpaca, openai; formats.py) -> schema rows, each with an
    id "<file stem>-<record number>" unless it has its own; a row of another shape is an error."""
    stem = Path(path).stem
    for n, (where, obj) in enumerate(iter_records(path), start=1):
        if shape_of(obj) not in ((fmt, "schema") if fmt == "openai" else (fmt,)):
            raise DataError(f"{where}: not a {fmt} row (keys: {', '.join(sorted(map(str, obj))[:6])})")
        row = to_row(obj, where, source)
        if source:  # given for every row: it replaces a source the row carries
            row["source"] = source
        row.setdefault("id", f"{stem}-{n}")
        yield validate(row, where)


def convert(fmt: str, paths: list, source: str | None = None, encoding: str | None = None,
            all_answers: bool = False) -> Iterator[dict]:
    """Rows from one or more files of a public format (cmedqa2 takes questions, answers)."""
    if fmt == "cmedqa2":
        if len(paths) != 2:
            raise DataError(f"cmedqa2 needs two files (questions.csv answers.csv), got {len(paths)}")
        yield from convert_cmedqa2(paths[0], paths[1], source, all_answers, encoding)
        return
    for path in paths:
        if fmt == "huatuo_sft":
            yield from convert_huatuo_sft(path, source)
        elif fmt == "huatuo26m":
            yield from convert_huatuo26m(path, source)
        elif fmt == "cmd_csv":
            yield from convert_cmd_csv(path, source, encoding)
        elif fmt == "cmd_jsonl":
            yield from convert_cmd_jsonl(path, source)
        elif fmt == "webmedqa":
            yield from convert_webmedqa(path, source, encoding)
        elif fmt in FOREIGN:
            yield from convert_foreign(fmt, path, source)
        else:
            raise DataError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


# ---------------------------------------------------------------- mixing


def mix_sources(rows: list[dict], weights: dict[str, float], seed: int, total: int | None = None) -> list[dict]:
    """Resample rows per source and shuffle, deterministically by seed.

    A weight multiplies its source's row count: 0.5 keeps a random half, 2 takes
    every row twice. Above 1 each row is repeated floor(w) times and the fraction
    left is sampled without replacement, so no row is lost by chance. With
    `total`, the per-source counts are rescaled to sum to exactly `total`.
    Sources absent from `weights`, or weighted 0, are dropped.
    """
    by_source = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    for source, w in weights.items():
        if w < 0:
            raise ValueError(f"weight for {source!r} is negative: {w}")
        if w > 0 and source not in by_source:
            raise ValueError(f"weight given for source {source!r} but no row has it")
    wanted = {s: w * len(by_source[s]) for s, w in sorted(weights.items()) if w > 0}
    if total is None:
        counts = {s: round(v) for s, v in wanted.items()}
    else:
        mass = sum(wanted.values())
        if mass == 0:
            raise ValueError("all weights are zero, cannot draw a total")
        counts = _round_to_sum({s: total * v / mass for s, v in wanted.items()}, total)
    rng = random.Random(seed)
    out = []
    for source, k in counts.items():
        pool = by_source[source]
        whole, rest = divmod(k, len(pool))
        out.extend(pool * whole)
        out.extend(rng.sample(pool, rest))
    rng.shuffle(out)
    return out


def _round_to_sum(wanted: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts near `wanted` summing to `total`; largest remainders get the extra ones."""
    counts = {s: int(v) for s, v in wanted.items()}
    by_remainder = sorted(wanted, key=lambda s: (counts[s] - wanted[s], s))
    for s in by_remainder[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


def split_heldout(rows: list[dict], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, heldout) with round(frac * n) held out; both keep input order."""
    if not 0 <= frac < 1:
        raise ValueError(f"heldout fraction must be in [0, 1), got {frac}")
    n_held = round(frac * len(rows))
    held = set(random.Random(seed).sample(range(len(rows)), n_held))
    train = [r for i, r in enumerate(rows) if i not in held]
    heldout = [r for i, r in enumerate(rows) if i in held]
    return train, heldout


# ---------------------------------------------------------------- prompts and stats


def row_id(row: dict) -> str:
    """The row's id, or a stable hash of its messages when it has none."""
    if row.get("id"):
        return row["id"]
    blob = json.dumps(row["messages"], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def to_prompt(row: dict) -> dict:
    """RLAIF prompt: the conversation up to its last answer, and that answer as reference (plus the
    row's `references` when it has several)."""
    messages = row.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"row {row.get('id', '?')}: a prompt needs a conversation ending with an assistant message")
    prompt = {
        "id": row_id(row),
        "messages": messages[:-1],
        "reference": messages[-1]["content"],
    }
    if row.get("department"):  # optional in prompts as in the schema: left out, not null
        prompt["department"] = row["department"]
    if row.get("references"):
        prompt["references"] = row["references"]
    return prompt


def _summary(values: list[int]) -> dict:
    """min/mean/median/max of a list of lengths (zeros when empty)."""
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {"min": min(values), "mean": round(statistics.fmean(values), 1),
            "median": float(statistics.median(values)), "max": max(values)}


def stats(rows: list[dict]) -> dict:
    """Counts per source, department and number of turns; char lengths per role."""
    chars = {"user": [], "assistant": []}
    turns = Counter()
    for row in rows:
        turns[sum(m["role"] == "assistant" for m in row["messages"])] += 1
        for m in row["messages"]:
            if m["role"] in chars:
                chars[m["role"]].append(len(m["content"]))
    return {
        "rows": len(rows),
        "sources": dict(Counter(r["source"] for r in rows).most_common()),
        "departments": dict(Counter(r.get("department", "(none)") for r in rows).most_common()),
        "turns": dict(sorted(turns.items())),
        "chars": {role: _summary(v) for role, v in chars.items()},
    }


if __name__ == "__main__":
    # `python -m nanohuatuo.data`, the command's earlier address, still runs it: the command line lives in
    # the stage layer (prepare.py), which this core module must not import, so it is run by name
    import runpy
    runpy.run_module("nanohuatuo.prepare", run_name="__main__", alter_sys=True)
