"""Stage 0, data: convert public corpora to the conversation schema, mix sources, make RLAIF prompt files.

    python data.py convert --format cmd_csv --data 内科.csv --out runs/real_doctor.jsonl
    python data.py mix     --data a.jsonl b.jsonl --weights real_doctor_instructions=2,other=1 --out mix.jsonl
    python data.py prompts --data runs/real_doctor.jsonl --out runs/prompts.jsonl
    python data.py stats   --data mix.jsonl

The same command is `python -m nanohuatuo.prepare` and the `nanohuatuo-data` console script
(`python -m nanohuatuo.data` still runs it). The readers, converters, mixing and splitting are
data.py's (the formats and their rules are in its docstring); this module is only the command
line, built on cli.py's flags like every other stage.
"""

import itertools
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .cli import UserError, arg, commands_main
from .data import (FORMATS, DataError, convert, load_conversations, mix_sources, require_rows, split_heldout,
                   stats, to_prompt, write_jsonl)

CONVERSATIONS = "conversation file(s): schema JSONL, or any shape SFT reads"


@dataclass
class ConvertConfig:
    data: list[str] = arg([], "input file(s) (sharegpt/alpaca/openai: also a JSON array, Parquet or a datasets "
                              "folder); cmedqa2: questions.csv answers.csv", metavar="FILE", old=("--in",))
    format: str = arg("", "the corpus' format (see nanohuatuo/data.py)", choices=list(FORMATS))
    out: str = arg("", "output JSONL file")
    source: str | None = arg(None, "source for every row (defaults per format, see nanohuatuo/data.py)")
    encoding: str | None = arg(None, "force the CSV encoding (default: UTF-8 if clean, else GB18030)")
    limit: int | None = arg(None, "stop after this many rows", bounds="[1, inf)")
    all_answers: bool = arg(False, "cmedqa2: one row per answer, not per question")


@dataclass
class MixConfig:
    data: list[str] = arg([], CONVERSATIONS, metavar="FILE", old=("--in",))
    weights: dict = arg({}, "source=w,... (w multiplies the source's count)", metavar="SOURCE=W,...")
    out: str = arg("", "output JSONL file")
    seed: int = arg(0, "random seed")
    total: int | None = arg(None, "rescale the counts to exactly this many rows", bounds="[1, inf)")
    heldout: float = arg(0.0, "fraction held out before resampling", bounds="[0, 1)")
    heldout_out: str = arg("", "where the held-out rows go (needed with --heldout)")
    keep_flagged: bool = arg(False, "keep rows marked flagged (a polished reply whose drug names or numbers "
                                    "changed); by default they are dropped before the held-out split")


@dataclass
class PromptsConfig:
    data: str = arg("", "conversation file: schema JSONL, or any shape SFT reads", metavar="FILE", old=("--in",))
    out: str = arg("", "output JSONL file of prompts")


@dataclass
class StatsConfig:
    data: list[str] = arg([], CONVERSATIONS, metavar="FILE", old=("--in",))


def need(cfg, *flags: str) -> None:
    """A flag every run of the command needs (the dataclass flags have defaults, so argparse cannot require it)."""
    for name in flags:
        if not getattr(cfg, name.lstrip("-").replace("-", "_")):
            raise UserError(f"pass {name}" + (" FILE" if name in ("--data", "--out") else ""))


def run_convert(cfg: ConvertConfig) -> None:
    need(cfg, "--data", "--format", "--out")
    if cfg.all_answers and cfg.format != "cmedqa2":
        raise DataError("--all-answers only applies to --format cmedqa2")
    if cfg.source is not None and not cfg.source.strip():
        raise UserError(f"--source {cfg.source!r}: give a source name (e.g. real_doctor_instructions), or leave "
                        "the flag out for the format's default")
    groups = [cfg.data] if cfg.format == "cmedqa2" else [[path] for path in cfg.data]
    counts = []

    def rows():
        for group in groups:
            counts.append(0)
            for row in convert(cfg.format, group, cfg.source, cfg.encoding, cfg.all_answers):
                counts[-1] += 1
                yield row
            if not counts[-1]:  # raised before the output is renamed into place, so none is written
                raise DataError(f"{' + '.join(map(str, group))}: no records to convert (the file is empty, "
                                "or holds blank lines or a header only)")

    n = write_jsonl(cfg.out, itertools.islice(rows(), cfg.limit))
    for i, group in enumerate(groups):
        names = ' + '.join(map(str, group))
        print(f"converted {counts[i]} rows from {names} ({cfg.format})" if i < len(counts) else
              f"not read: {names} (--limit {cfg.limit} reached)")
    print(f"wrote {n} rows to {cfg.out}")


def run_mix(cfg: MixConfig) -> None:
    need(cfg, "--data", "--weights", "--out")
    if cfg.heldout and not cfg.heldout_out:
        raise UserError("--heldout needs --heldout-out")
    if cfg.heldout and Path(cfg.heldout_out).resolve() == Path(cfg.out).resolve():
        raise UserError(f"--heldout-out {cfg.heldout_out} is --out: the held-out rows would overwrite the mix")
    bad = {source: w for source, w in cfg.weights.items() if w < 0}
    if bad:
        raise UserError(f"--weights: {', '.join(f'{s}={w:g}' for s, w in bad.items())}: a weight is at least 0")
    rows = []
    for path in cfg.data:
        part = require_rows(load_conversations(path), path, "conversations")
        print(f"read {len(part)} rows from {path}")
        rows.extend(part)
    # distill.py polish --on-flag keep marks a row whose rewrite changed drug names or numbers
    flagged = Counter(r["source"] for r in rows if r.get("flagged"))
    if flagged:
        per_source = ", ".join(f"{s} {n}" for s, n in sorted(flagged.items()))
        if cfg.keep_flagged:
            print(f"kept {flagged.total()} flagged rows (--keep-flagged): {per_source}")
        else:
            rows = [r for r in rows if not r.get("flagged")]
            print(f"dropped {flagged.total()} flagged rows (a polished reply changed drug names or numbers; "
                  f"--keep-flagged keeps them): {per_source}")
    # held-out rows are taken before resampling so no duplicate leaks into both sides
    pool = [r for r in rows if cfg.weights.get(r["source"], 0) > 0]
    train, heldout = split_heldout(pool, cfg.heldout, cfg.seed) if cfg.heldout else (pool, [])
    mixed = mix_sources(train, cfg.weights, cfg.seed, cfg.total)
    if not mixed:  # nothing to train on: say why rather than write an empty file
        raise UserError(f"--weights {','.join(f'{s}={w:g}' for s, w in cfg.weights.items())}: no rows to mix "
                        f"(the sources read are {', '.join(sorted(Counter(r['source'] for r in rows)))})")
    # rows in: read, less the flagged ones dropped above; the held-out ones are taken from them before weighting
    have, held, got = (Counter(r["source"] for r in part) for part in (rows, heldout, mixed))
    for source in sorted(have):
        out = f", {held[source]} held out" if cfg.heldout else ""
        print(f"  {source}: {have[source]} in{out}, weight {cfg.weights.get(source, 0):g}, {got[source]} out")
    print(f"wrote {write_jsonl(cfg.out, mixed)} rows to {cfg.out}")
    if cfg.heldout:
        print(f"wrote {write_jsonl(cfg.heldout_out, heldout)} held-out rows to {cfg.heldout_out}")


def run_prompts(cfg: PromptsConfig) -> None:
    need(cfg, "--data", "--out")
    rows = require_rows(load_conversations(cfg.data), cfg.data, "conversations")
    n = write_jsonl(cfg.out, (to_prompt(r) for r in rows))
    print(f"read {len(rows)} rows from {cfg.data}; wrote {n} prompts to {cfg.out}")


def run_stats(cfg: StatsConfig) -> None:
    need(cfg, "--data")
    for path in cfg.data:
        s = stats(require_rows(load_conversations(path), path, "conversations"))
        print(f"{path}: {s['rows']} rows")
        for key in ("sources", "departments", "turns"):
            print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in s[key].items()))
        for role, summary in s["chars"].items():
            print(f"  {role} chars: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


COMMANDS = {
    "convert": (run_convert, ConvertConfig, "convert a public corpus to the conversation schema"),
    "mix": (run_mix, MixConfig, "resample sources by weight into one shuffled file"),
    "prompts": (run_prompts, PromptsConfig, "RLAIF prompt file: conversation minus last answer, plus reference"),
    "stats": (run_stats, StatsConfig, "counts per source/department, turns and char lengths"),
}


def main(argv=None) -> int:
    """Entry point of data.py: the first argument names the command; 2 and one line on bad input."""
    return commands_main(COMMANDS, argv, prog="data.py")


if __name__ == "__main__":
    sys.exit(main())
