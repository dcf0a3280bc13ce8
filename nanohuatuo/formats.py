"""The files conversations come in, and the row shapes other tools write, read as records with a place.

Files (`iter_records(path)` yields ("file:line" or "file: row N", object) for each record):
  - JSONL: one JSON object a line (UTF-8, a BOM allowed), blank lines skipped.
  - JSON: one array of objects (Alpaca's and LLaMA-Factory's files); each object's place is the line
    it starts on. A file whose first character is `[` is read this way whatever its name ends with.
  - Parquet (`.parquet`), when pyarrow is installed (`pip install ".[parquet]"` in the repository).
  - A folder written by the `datasets` library's `save_to_disk` (its "train" split when it holds
    several), when that library is installed (`pip install ".[datasets]"` in the repository), or a folder
    of Parquet files (read in name order).
CSV files (`iter_csv`) are UTF-8 when their bytes decode cleanly as that, else GB18030, the
encoding of the Chinese medical corpora; tab-separated text (`iter_tsv`) likewise.

Row shapes (`to_row(obj, where, source)` turns one into a conversation row of data.py's schema,
still to be validated there; the shape is told per row, so one file may mix them):
  - the schema itself: "messages" and "source"; returned unchanged.
  - OpenAI chat: {"messages": [{"role", "content"}, ...]} without "source". A content may be a
    list of parts ({"type": "text", "text": ...}); "developer" is read as "system". Tool calls
    and tool results have no place in the schema and are refused.
  - ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}, an
    optional top-level "system"; "user"/"assistant" (and role/content items) are read too.
  - Alpaca: {"instruction", "input" (optional), "output"}: the user turn is the instruction,
    then the input after a newline when it is not empty; an optional "system" and "history"
    ([[question, answer], ...], LLaMA-Factory's earlier turns) come first.
A foreign row keeps its "id" and "source" when it has string ones; otherwise `source` (default
"other") is used. A row of none of these shapes, or of one with a wrong part, is a DataError
naming the place and what was expected.
"""

import csv
import io
import json
from pathlib import Path
from typing import Iterator

DEFAULT_SOURCE = "other"
SHAPES = ("schema", "openai", "sharegpt", "alpaca")
_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
             "bard": "assistant", "model": "assistant", "system": "system"}


class DataError(ValueError):
    """A malformed file or row; the message starts with `file:line:` (or `where:`)."""


# ---------------------------------------------------------------- files of records


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a UTF-8 JSONL file; a file holding one JSON array
    of objects (as many datasets are shipped) is read as its items, each at the line it starts on."""
    with open(path, "rb") as f:
        if f.peek(64)[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # peeked: a pipe cannot seek back
            yield from json_array_items(path, f.read())
            return
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line drops a BOM some editors write
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8: {e.reason}") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def json_array_items(path, data: bytes) -> Iterator[tuple[int, dict]]:
    """Yield (line the object starts on, object) for each item of `data`, the bytes of `path`, one JSON array."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8: {e.reason}") from None
    decoder = json.JSONDecoder()
    seen = [0, 1]  # a position and its line: lines are counted on from the last item, not from the start each time

    def line(pos):
        seen[:] = pos, seen[1] + text.count("\n", seen[0], pos)
        return seen[1]

    def skip(pos):  # past whitespace
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(0) + 1  # past the "["
    while True:
        pos = skip(pos)
        if pos < len(text) and text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line(pos)}: expected a JSON object, got {type(obj).__name__}")
        yield line(pos), obj
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise DataError(f"{path}:{line(pos)}: bad JSON: expected ',' or ']' after an item")


def _needs(module: str, extra: str, what: str, path):
    """Import an optional library, or a DataError saying which extra to install."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the {module} library: pip install \".[{extra}]\" in "
                        f"the repository (or pip install {module})") from None


def _iter_table(rows: list[dict], path) -> Iterator[tuple[str, dict]]:
    for i, obj in enumerate(rows, start=1):
        yield f"{path}: row {i}", obj


def iter_parquet(path) -> Iterator[tuple[str, dict]]:
    """Yield ("file: row N", object) for each row of a Parquet file (needs pyarrow)."""
    _needs("pyarrow", "parquet", "Parquet", path)
    import pyarrow.parquet as pq  # the submodule is not loaded by `import pyarrow`
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own errors (ArrowInvalid, ...) are not ValueErrors
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    yield from _iter_table(rows, path)


def iter_dataset_dir(path) -> Iterator[tuple[str, dict]]:
    """Yield ("folder: row N", object) for a `datasets` save_to_disk folder, or a folder of Parquet files."""
    path = Path(path)
    if any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        datasets = _needs("datasets", "datasets", "a datasets folder", path)
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise DataError(f"{path}: a datasets folder without a 'train' split (it has {', '.join(dataset)}); "
                                f"pass the split's own folder")
            dataset = dataset["train"]
        yield from _iter_table(list(dataset), path)
        return
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"{path}: a folder, but neither a datasets save_to_disk folder nor one of Parquet files")
    for file in files:
        yield from iter_parquet(file)


def iter_records(path) -> Iterator[tuple[str, dict]]:
    """Yield (place, object) for each record of a JSONL, JSON-array or Parquet file or a datasets folder."""
    path = Path(path)
    if path.is_dir():
        yield from iter_dataset_dir(path)
    elif path.suffix == ".parquet":
        yield from iter_parquet(path)
    else:
        for lineno, obj in iter_jsonl(path):
            yield f"{path}:{lineno}", obj


def decode_text(path, encoding: str | None) -> str:
    """File text in `encoding`, or UTF-8 (BOM allowed) when clean, else GB18030."""
    data = Path(path).read_bytes()
    if encoding is None:
        # UTF-8 first: UTF-8 Chinese often decodes without error as GB18030 mojibake
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            encoding = "gb18030"
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: cannot decode as {encoding}: {e.reason}") from None


def iter_csv(path, columns: tuple[str, ...], encoding: str | None) -> Iterator[tuple[int, dict]]:
    """Yield (first line of the record, {column: value}) for a CSV with a header row."""
    reader = csv.reader(io.StringIO(decode_text(path, encoding), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}:1: empty file, expected header {','.join(columns)}") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: bad CSV: {e}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}:1: header lacks {', '.join(missing)} (expected {','.join(columns)})")
    end = reader.line_num
    while True:
        # a quoted field may span lines, so a record starts just after the previous one ends
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: bad CSV: {e}") from None
        end = reader.line_num
        if not record:
            continue
        if len(record) != len(header):
            raise DataError(f"{path}:{start}: expected {len(header)} fields, got {len(record)}")
        yield start, dict(zip(header, record))


def iter_tsv(path, n_fields: int, layout: str, encoding: str | None) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, fields) for each non-blank line of tab-separated text without a header."""
    # lines end at "\n" (and "\r\n") only: splitlines() also splits at the form feeds, U+2028 and the like
    # that scraped answers hold, and then the line numbers are wrong too
    for lineno, line in enumerate(decode_text(path, encoding).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != n_fields:
            raise DataError(f"{path}:{lineno}: expected {n_fields} tab-separated fields ({layout}), got {len(fields)}")
        yield lineno, fields


# ---------------------------------------------------------------- row shapes


def shape_of(obj: dict) -> str | None:
    """Which of SHAPES a record has, or None."""
    if "messages" in obj:
        return "schema" if "source" in obj else "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def _text(value, what: str, where: str) -> str:
    """A turn's text: a string, or OpenAI's list of text parts joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(p.get("text") if isinstance(p.get("text"), str) else "\0" for p in value)
        if "\0" in value:
            raise DataError(f"{where}: {what}: a text part without a string 'text'")
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string (or a list of text parts), got {type(value).__name__}")
    return value


def _openai(obj: dict, where: str) -> list[dict]:
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: OpenAI row: 'messages' must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: OpenAI row: messages[{i}] must be an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise DataError(f"{where}: OpenAI row: messages[{i}] is a tool call or result, which SFT does not train on")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: OpenAI row: messages[{i}]: bad role {m.get('role')!r} "
                            f"(expected system, user or assistant)")
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content", where)})
    return out


def _sharegpt(obj: dict, where: str) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: ShareGPT row: 'conversations' must be a list")
    out = []
    if obj.get("system") is not None:
        out.append({"role": "system", "content": _text(obj["system"], "'system'", where)})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: ShareGPT row: conversations[{i}] must be an object")
        speaker = t.get("from", t.get("role"))
        if speaker not in _SPEAKERS:
            raise DataError(f"{where}: ShareGPT row: conversations[{i}]: unknown speaker {speaker!r} "
                            f"(expected human, gpt or system)")
        text = t.get("value", t.get("content"))
        out.append({"role": _SPEAKERS[speaker], "content": _text(text, f"conversations[{i}].value", where)})
    return out


def _alpaca(obj: dict, where: str) -> list[dict]:
    out = []
    if obj.get("system") is not None:
        out.append({"role": "system", "content": _text(obj["system"], "'system'", where)})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: Alpaca row: 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: Alpaca row: history[{i}] must be a [question, answer] pair of strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(obj["instruction"], "'instruction'", where)
    extra = _text(obj.get("input") or "", "'input'", where)
    question = f"{instruction.strip()}\n{extra.strip()}" if extra.strip() else instruction
    out += [{"role": "user", "content": question}, {"role": "assistant", "content": _text(obj["output"], "'output'", where)}]
    return out


def to_row(obj: dict, where: str, source: str | None = None) -> dict:
    """One record of any shape in SHAPES as a schema row (not yet validated); `source` for foreign rows
    that carry none (default "other")."""
    shape = shape_of(obj)
    if shape == "schema":
        return obj
    if shape is None:
        keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
        raise DataError(f"{where}: unknown row shape (keys: {keys}); expected the schema ('messages' and 'source'), "
                        f"OpenAI 'messages', ShareGPT 'conversations' or Alpaca 'instruction'/'output' (a public "
                        f"corpus' own rows: `python data.py convert --format ...` first)")
    messages = {"openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca}[shape](obj, where)
    own = obj.get("source")
    row = {"messages": messages, "source": own if isinstance(own, str) and own.strip() else source or DEFAULT_SOURCE}
    if isinstance(obj.get("id"), str):
        row["id"] = obj["id"]
    return row
