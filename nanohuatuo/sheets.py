"""The blind sheet and the tally: file formats of the human side-by-side evaluation.

- write_sheet: a finished pairwise or dialogue run (its pairs.jsonl) as a shuffled, blind sheet:
  sheet.html (self-contained; marks kept in the browser, downloaded as CSV), sheet.csv (with a
  BOM so spreadsheets read the Chinese as UTF-8) and sheet_key.json (which side was which, and the
  judge's outcome; kept away from the raters).
- Each sheet has an id (a hash of its blind order and sides) in its key, its page and every row of
  its CSVs: the page keeps its marks in the browser under it (two sheets opened in one browser do
  not share marks), and tally refuses a marks file that names another sheet (an older sheet, or
  one made again with another seed, would map the marks to the wrong candidates).
- read_marks: a marked CSV (columns item, mark; 1/2/= and their spellings in MARKS) back to
  '1' | '2' | 'tie' per item; tally turns each rater's marks into win/tie/loss for candidate A and
  their agreement with the judge (percent and Cohen's kappa, winrate.py); with several raters also
  their agreement with one another (Fleiss' kappa over the items all of them marked) and each
  item's outcome by vote (the most votes; "no majority" when two outcomes share the most);
  write_tally writes tally.md and tally.json.
"""

import csv
import hashlib
import html
import io
import json
import random
from pathlib import Path

from .cli import UserError, prepare_out
from .data import read_jsonl
from .winrate import NO_MAJORITY, cohen_kappa, fleiss_kappa, majority


WTL = ("win", "tie", "loss")  # candidate A's outcomes, in table order

MARKS = {"1": "1", "left": "1", "l": "1", "左": "1", "回答1": "1",
         "2": "2", "right": "2", "r": "2", "右": "2", "回答2": "2",
         "=": "tie", "0": "tie", "tie": "tie", "t": "tie", "equal": "tie", "相当": "tie", "平": "tie"}


def write_sheet(source: str, out: str, seed: int = 0, limit: int = 0, overwrite: bool = False) -> dict:
    """A blind, shuffled sheet of a pairwise/dialogue run in `source`: sheet.html, sheet.csv, sheet_key.json
    in `out`; the first `limit` items of the shuffled order (0: all)."""
    src = Path(source)
    if not (src / "pairs.jsonl").is_file():
        raise UserError(f"--source {source}: no pairs.jsonl there; pass the --out of a pairwise or dialogue run")
    pairs = [p for p in read_jsonl(src / "pairs.jsonl") if p["answer_a"] is not None and p["answer_b"] is not None]
    summary_src = json.loads((src / "summary.json").read_text(encoding="utf-8")) if (src / "summary.json").is_file() else {}
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[: limit or None]
    with prepare_out(out, overwrite=overwrite):
        out = Path(out)
        key, rows = [], []
        for k, p in enumerate(pairs, start=1):
            left = rng.choice("AB")
            first, second = (p["answer_a"], p["answer_b"]) if left == "A" else (p["answer_b"], p["answer_a"])
            reference = p["reference"] if summary_src.get("mode") == "dialogue" else ""
            rows.append({"item": str(k), "question": p["prompt"], "reference": reference,
                         "answer_1": first, "answer_2": second, "mark": ""})
            key.append({"item": str(k), "id": p["id"], "group": p["group"], "left": left, "judge": p.get("outcome")})
        blind = json.dumps([(str(src.resolve()), k["id"], k["left"]) for k in key], ensure_ascii=False)
        sheet_id = hashlib.sha1(blind.encode()).hexdigest()[:12]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["item", "question", "reference", "answer_1", "answer_2", "mark", "sheet"])
        w.writeheader()
        w.writerows({**r, "sheet": sheet_id} for r in rows)
        # a BOM so spreadsheet programs open the Chinese text as UTF-8
        (out / "sheet.csv").write_text("\ufeff" + buf.getvalue(), encoding="utf-8")
        meta = {"sheet_id": sheet_id, "source": str(src), "mode": summary_src.get("mode"), "a": summary_src.get("a"),
                "b": summary_src.get("b"), "judge": summary_src.get("judge"), "seed": seed, "items": key}
        (out / "sheet_key.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (out / "sheet.html").write_text(sheet_html(rows, summary_src.get("mode") == "dialogue", sheet_id),
                                        encoding="utf-8")
    print(f"sheet: {len(rows)} items in {out / 'sheet.html'} and {out / 'sheet.csv'}; keep {out / 'sheet_key.json'} "
          "away from the raters")
    return {"mode": "sheet", "items": len(rows), "out": str(out)}


SHEET_CSS = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}
.item{border:1px solid #ccc;border-radius:6px;padding:.8em;margin:1em 0}
.q{white-space:pre-wrap;background:#f5f5f5;padding:.5em}.ref{white-space:pre-wrap;background:#f0f6ff;padding:.5em}
.pair{display:flex;gap:1em}.pair>div{flex:1;white-space:pre-wrap;border-left:3px solid #ddd;padding-left:.6em}
.marks label{margin-right:1.5em}.note{color:#a33}"""

SHEET_JS = """const KEY='nanohuatuo-sheet-'+SHEET;
function save(){const m={};document.querySelectorAll('input[type=radio]:checked').forEach(r=>m[r.name]=r.value);
m.rater=document.getElementById('rater').value;localStorage.setItem(KEY,JSON.stringify(m));}
function load(){const m=JSON.parse(localStorage.getItem(KEY)||'{}');for(const[k,v]of Object.entries(m)){
if(k==='rater'){document.getElementById('rater').value=v;continue;}
const r=document.querySelector(`input[name="${k}"][value="${v}"]`);if(r)r.checked=true;}}
function download(){const rater=document.getElementById('rater').value||'rater';
let csv='item,mark,rater,sheet\\n';document.querySelectorAll('.item').forEach(d=>{const id=d.dataset.item;
const r=document.querySelector(`input[name="m${id}"]:checked`);
csv+=`${id},${r?r.value:''},"${rater.replace(/"/g,'""')}",${SHEET}\\n`;});
const a=document.createElement('a');a.href=URL.createObjectURL(new Blob(['\\ufeff'+csv],{type:'text/csv'}));
a.download='marks-'+rater+'.csv';a.click();}
document.addEventListener('change',save);window.addEventListener('load',load);"""


def sheet_html(rows: list[dict], dialogue: bool, sheet_id: str) -> str:
    """A self-contained page: each item's question (or case), two unnamed answers, three marks."""
    e = html.escape
    what = "问诊对话" if dialogue else "回答"
    parts = [f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>blind evaluation sheet</title>"
             f"<style>{SHEET_CSS}</style></head><body><h1>盲评表 · Blind evaluation</h1>"
             f"<p>每一题有两个{what}，顺序随机，不显示来自哪个模型。请按准确性、完整性、安全性和是否切题，选出更好的一个。"
             f"<br>Each item shows two anonymous {'consultations' if dialogue else 'answers'} in random order; "
             "mark the better one (or equal). Marks are kept in this browser; press the button to download them "
             "as a CSV.</p><p class='note'>Research use only; the answers are model outputs, not medical advice.</p>"
             "<p>评估人 Rater: <input id='rater'> <button onclick='download()'>下载评分 Download marks (CSV)</button></p>"]
    for r in rows:
        i = e(r["item"])
        ref = f"<p><b>真实医生诊断 Real doctor's diagnosis</b></p><div class='ref'>{e(r['reference'])}</div>" \
            if r["reference"] else ""
        parts.append(
            f"<div class='item' data-item='{i}'><h3>#{i}</h3><div class='q'>{e(r['question'])}</div>{ref}"
            f"<div class='pair'><div><b>{what}1</b>\n{e(r['answer_1'])}</div><div><b>{what}2</b>\n{e(r['answer_2'])}</div></div>"
            f"<p class='marks'><label><input type='radio' name='m{i}' value='1'> {what}1更好 (1 better)</label>"
            f"<label><input type='radio' name='m{i}' value='='> 相当 (equal)</label>"
            f"<label><input type='radio' name='m{i}' value='2'> {what}2更好 (2 better)</label></p></div>")
    parts.append(f"<script>const SHEET='{sheet_id}';\n{SHEET_JS}</script></body></html>\n")
    return "\n".join(parts)


def read_marks(path: str, sheet_id: str | None = None) -> dict[str, str]:
    """item -> '1' | '2' | 'tie' from a marked CSV (columns item, mark); blank marks are skipped. A
    row naming another sheet than `sheet_id` (its `sheet` column) is refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--marks {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--marks {path}: not UTF-8 ({e.reason} at byte {e.start}); save the sheet as UTF-8 "
                        f"CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "item" not in reader.fieldnames or "mark" not in reader.fieldnames:
        raise UserError(f"{path}:1: needs columns 'item' and 'mark' (got {reader.fieldnames})")
    marks = {}
    for line, row in enumerate(reader, start=2):
        other = (row.get("sheet") or "").strip()
        if sheet_id and other and other != sheet_id:
            raise UserError(f"{path}:{line}: marks of sheet {other}, not of this one ({sheet_id}): the items would "
                            f"map to the wrong answers; pass the marks of this sheet")
        mark = (row.get("mark") or "").strip().lower()
        if not mark:
            continue
        if mark not in MARKS:
            raise UserError(f"{path}:{line}: mark {row['mark']!r} for item {row['item']}: use 1, 2 or = "
                            "(also left/right/tie, 左/右/相当)")
        marks[(row.get("item") or "").strip()] = MARKS[mark]
    return marks


def read_key(sheet: str) -> dict:
    """The sheet's sheet_key.json: its source run and, per item, the id, the side shown left and the judge's outcome."""
    keyfile = Path(sheet) / "sheet_key.json"
    if not keyfile.is_file():
        raise UserError(f"--sheet {sheet}: no sheet_key.json there; pass the --out of `evaluate.py sheet`")
    return json.loads(keyfile.read_text(encoding="utf-8"))


def tally(meta: dict, mark_files: list[str], sheet: str) -> dict:
    """Each rater's marks as win/tie/loss for candidate A, and their agreement with the judge (also pooled)."""
    key = {k["item"]: k for k in meta["items"]}
    raters, pooled_h, pooled_j, votes = [], [], [], {i: [] for i in key}
    for path in mark_files:
        marks = read_marks(path, meta.get("sheet_id"))
        unknown = sorted(set(marks) - set(key))
        if unknown:
            raise UserError(f"{path}: items {', '.join(unknown[:5])} are not on the sheet {sheet}")
        outcomes = {}
        for item, m in marks.items():
            left = key[item]["left"]
            outcomes[item] = "tie" if m == "tie" else ("win" if (m == "1") == (left == "A") else "loss")
            votes[item].append(outcomes[item])
        human = [outcomes[i] for i in sorted(outcomes, key=int)]
        both = [(outcomes[i], key[i]["judge"]) for i in sorted(outcomes, key=int) if key[i]["judge"]]
        h, j = [a for a, _ in both], [b for _, b in both]
        pooled_h += h
        pooled_j += j
        raters.append({"file": path, "marked": len(human), "unmarked": len(key) - len(human),
                       **{k: human.count(k) for k in ("win", "tie", "loss")},
                       "compared": len(both), "agreement": 100 * sum(a == b for a, b in both) / len(both) if both else None,
                       "kappa": cohen_kappa(h, j)})
    pooled = {"compared": len(pooled_h),
              "agreement": 100 * sum(a == b for a, b in zip(pooled_h, pooled_j)) / len(pooled_h) if pooled_h else None,
              "kappa": cohen_kappa(pooled_h, pooled_j)}
    return {"mode": "tally", "a": meta.get("a"), "b": meta.get("b"), "judge": meta.get("judge"),
            "raters": raters, "pooled": pooled, **between_raters(votes, key, len(mark_files))}


def between_raters(votes: dict[str, list[str]], key: dict, n_raters: int) -> dict:
    """With two raters or more: Fleiss' kappa over the items every rater marked, and per marked item
    the votes and the outcome by vote (winrate.majority)."""
    if n_raters < 2:
        return {"between": None, "items": []}
    items = [{"item": i, "id": key[i]["id"], **{k: v.count(k) for k in WTL}, "majority": majority(v),
              "judge": key[i]["judge"]} for i, v in sorted(votes.items(), key=lambda kv: int(kv[0])) if v]
    full = [[it[k] for k in WTL] for it in items if sum(it[k] for k in WTL) == n_raters]
    by_vote = {k: sum(it["majority"] == k for it in items) for k in WTL + (NO_MAJORITY,)}
    return {"between": {"raters": n_raters, "items": len(full), "fleiss_kappa": fleiss_kappa(full),
                        "majority": by_vote}, "items": items}


def write_tally(out: Path, result: dict, sheet: str, items: int) -> list[str]:
    """tally.md (a table per rater, pooled when there are several; agreement between raters and the outcome
    by vote per item) and tally.json in `out`; the markdown lines, less the per-item table."""
    out.mkdir(parents=True, exist_ok=True)
    raters, pooled = result["raters"], result["pooled"]
    f = lambda v, fmt="{:.1f}": "–" if v is None else fmt.format(v)
    lines = [f"# Human evaluation: {result['a']} vs {result['b']}", "",
             f"Marks read back from a blind sheet (sheet {sheet}, {items} items); outcomes for "
             f"{result['a']}. Agreement with the automatic judge ({result['judge']}) over win/tie/loss.", "",
             "| rater | marked | W / T / L | compared with judge | agreement % | Cohen's kappa |",
             "|---|---|---|---|---|---|"]
    for r in raters:
        lines.append(f"| {Path(r['file']).name} | {r['marked']} | {r['win']} / {r['tie']} / {r['loss']} | "
                     f"{r['compared']} | {f(r['agreement'])} | {f(r['kappa'], '{:.3f}')} |")
    if len(raters) > 1:
        lines.append(f"| all raters | | | {pooled['compared']} | {f(pooled['agreement'])} | {f(pooled['kappa'], '{:.3f}')} |")
    table = []
    if result["between"]:
        b = result["between"]
        lines += ["", f"Between the {b['raters']} raters: Fleiss' kappa {f(b['fleiss_kappa'], '{:.3f}')} over the "
                  f"{b['items']} items all of them marked. Outcome by vote (the most votes; {NO_MAJORITY} when two "
                  "outcomes share the most): " + " / ".join(f"{b['majority'][k]} {k}" for k in b["majority"]) + "."]
        table = ["", "| item | id | votes W / T / L | by vote | judge |", "|---|---|---|---|---|"]
        table += [f"| {it['item']} | {it['id']} | {it['win']} / {it['tie']} / {it['loss']} | {it['majority']} | "
                  f"{it['judge'] or '–'} |" for it in result["items"]]
    # the per-item table goes to tally.md only; the lines returned are the summary printed
    (out / "tally.md").write_text("\n".join(lines + table) + "\n", encoding="utf-8")
    (out / "tally.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return lines
