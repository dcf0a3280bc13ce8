"""Evaluation sets, as evaluate.py reads them; errors are DataErrors naming the file and the item.

    read_records(path, what)       # a JSON list of objects, or JSONL
    load_questions(path)           # KUAKE-QIC: id, label, query[, reference] -> {id, group, query, reference?}
    load_cases(paths)              # Med-dialog cases (id, medical_case, doctor_diagnosis, Department) or
                                   # schema rows, as evaluate.py dialogue and distill.py conversations read them
    load_qa(paths, fmt="auto")     # a QA test set in the schema or any of data.py's formats
                                   # (detect_format tells which) -> prompt rows with their references

Separate from data.py, which holds the training schema and the converters these readers reuse.
"""

import json
from pathlib import Path

from .data import FORMATS, DataError, convert, iter_jsonl, load_conversations, row_id, to_prompt, validate


def read_records(path: str, what: str, flag: str = "--data") -> list[dict]:
    """A JSON list of objects, or JSONL; errors name the file and the item. Each row carries `_where` (FILE: item N,
    or FILE:LINE) and `_at` (N, or LINE)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{flag} {path}: no such file; pass a {what} file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); expected {what} as JSON or JSONL") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg}); expected a list of {what} objects") from None
        where = [f"{path}: item {i}" for i in range(len(rows))]
        at = list(range(len(rows)))
    else:
        rows, where, at = [], [], []
        for lineno, obj in iter_jsonl(path):
            rows.append(obj)
            where.append(f"{path}:{lineno}")
            at.append(lineno)
    for row, w in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{w}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{path}: no {what} in the file")
    return [dict(row, _where=w, _at=n) for row, w, n in zip(rows, where, at)]


def _field(row: dict, key: str, what: str, *alts) -> str:
    for k in (key, *alts):
        if isinstance(row.get(k), str) and row[k].strip():
            return row[k]
    raise DataError(f"{row['_where']}: {what} needs a non-empty string {key!r}")


def load_questions(path: str, limit: int = 0) -> list[dict]:
    """KUAKE-QIC items -> [{id, group (the intent label), query, reference?}]."""
    items = []
    for row in read_records(path, "question (KUAKE-QIC: id, label, query)"):
        if row.get("id") is None:
            raise DataError(f"{row['_where']}: question needs an 'id'")
        item = {"id": str(row["id"]), "group": str(row.get("label") or "(none)"),
                "query": _field(row, "query", "a question", "question")}
        if isinstance(row.get("reference"), str) and row["reference"].strip():
            item["reference"] = row["reference"]
        items.append(item)
    return _unique(items, path)[: limit or None]


def load_cases(paths: str | list[str], limit: int = 0, strict: bool = True) -> list[dict]:
    """Cases -> [{id, group (the department, else "(none)"), department (else ""), medical_case, doctor_diagnosis}],
    in file order, from Med-dialog records (a JSON list, or JSONL) or schema rows (the patient's turns are the
    case, the doctor's the diagnosis).

    strict (evaluate.py dialogue, whose judge compares against the diagnosis and whose results are kept by
    id): every case has an id, unique in the file, and a diagnosis. Otherwise (distill.py conversations) a
    missing id is FILE-STEM-N and the diagnosis may be empty."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    what = "case (Med-dialog: id, medical_case, doctor_diagnosis, Department; or schema rows)"
    items = []
    for path in paths:
        cases = [_case(row, strict, f"{Path(path).stem}-{row['_at']}") for row in read_records(path, what)]
        items += _unique(cases, path) if strict else cases
    return items[: limit or None]


def _case(row: dict, strict: bool, fallback_id: str) -> dict:
    where = row["_where"]
    if "medical_case" in row:
        if strict and row.get("id") is None:
            raise DataError(f"{where}: case needs an 'id'")
        case = _field(row, "medical_case", "a case")
        diagnosis = _field(row, "doctor_diagnosis", "a case") if strict else row.get("doctor_diagnosis") or ""
        department = row.get("Department") or row.get("department") or ""
        if not isinstance(diagnosis, str) or not isinstance(department, str):
            raise DataError(f"{where}: 'doctor_diagnosis' and 'Department' must be strings")
        case_id = str(row["id"]) if row.get("id") is not None else fallback_id
    elif "messages" in row:
        obj = validate({k: v for k, v in row.items() if k not in ("_where", "_at")}, where)
        turns = [m for m in obj["messages"] if m["role"] != "system"]
        case = "\n".join(m["content"] for m in turns if m["role"] == "user")
        diagnosis = "\n".join(m["content"] for m in turns if m["role"] == "assistant")
        department, case_id = obj.get("department") or "", row_id(obj)
        if strict and not diagnosis.strip():
            raise DataError(f"{where}: a case needs the doctor's reply (an assistant turn)")
    else:
        raise DataError(f"{where}: expected a schema row ('messages') or a Med-dialog case ('medical_case')")
    return {"id": case_id, "group": department or "(none)", "department": department, "medical_case": case,
            "doctor_diagnosis": diagnosis}


def _unique(items: list[dict], path: str) -> list[dict]:
    seen = set()
    for item in items:
        if item["id"] in seen:
            raise DataError(f"{path}: id {item['id']!r} appears twice; ids must be unique")
        seen.add(item["id"])
    return items


QA_FORMATS = ("auto", "schema", "huatuo26m", "cmedqa2", "cmd_csv", "cmd_jsonl")


def detect_format(paths: list[str]) -> str:
    """The QA format of the files from their names and first record."""
    if len(paths) == 2 and all(p.lower().endswith(".csv") for p in paths):
        return "cmedqa2"
    path = paths[0]
    if path.lower().endswith(".csv"):
        with open(path, "rb") as f:
            head = f.readline().decode("utf-8-sig", "replace")
        if "ask" in head and "answer" in head:
            return "cmd_csv"
        if "question_id" in head:
            raise DataError(f"--data {path}: looks like cMedQA2; pass both files: --data questions.csv answers.csv")
        raise DataError(f"--data {path}: unknown CSV header {head.strip()!r}; pass --format")
    for _, obj in iter_jsonl(path):
        if "messages" in obj:
            return "schema"
        if "title" in obj or "department" in obj:
            return "cmd_jsonl"
        if any(k in obj for k in ("questions", "question")):
            return "huatuo26m"
        raise DataError(f"--data {path}: cannot tell the format from keys {sorted(obj)}; pass --format")
    raise DataError(f"--data {path}: empty file")


def load_qa(paths: list[str], fmt: str = "auto", limit: int = 0) -> list[dict]:
    """QA pairs -> [{id, messages (the question turns), reference (the doctor's reply), references
    (every doctor's reply, what the metrics score against: [reference] unless the row has several)}]."""
    if not paths:
        raise DataError("pass --data FILE (a QA test set; cMedQA2: --data questions.csv answers.csv)")
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"--data {p}: no such file")
    fmt = detect_format(paths) if fmt == "auto" else fmt
    if fmt == "schema":
        rows = [r for p in paths for r in load_conversations(p)]
    elif fmt in FORMATS:
        rows = list(convert(fmt, paths))
    else:
        raise DataError(f"--format {fmt!r}: use one of {', '.join(QA_FORMATS)}")
    items = [{**p, "references": p.get("references") or [p["reference"]]} for p in map(to_prompt, rows)]
    if not items:
        raise DataError(f"--data {' '.join(paths)}: no question/answer pairs ({fmt})")
    return items[: limit or None]
