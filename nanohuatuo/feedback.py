"""Judge feedback for RLAIF: rank the SFT model's sampled answers to each prompt.

Asks the judge prompt (HuatuoGPT's criteria: informativeness, coherence,
agreement with human preference and accuracy, with the real doctor's reply as
the reference) and reads its final ranking line with a strict parser (both in
rank_prompt.py, one layer down, shared with GRPO's endpoint reward); holds the choice
of the answers to rank (repeats and answers cut by max_new_tokens left out), `EndpointRanker`
(any OpenAI-compatible server, through `llm.LLM`: cache, concurrency, retries,
usage), `OfflineRanker` (similarity to the doctor's reply, no network), the
conversion of rankings into reward-model preference records, and a CLI:

    python -m nanohuatuo.feedback rank --data samples.jsonl --out prefs.jsonl \\
        [--judge endpoint|offline] [--judge-base-url URL --judge-model-name NAME --judge-api-key KEY \\
         --cache FILE --concurrency N --mixed --seed S --refresh-unusable]

Item (one JSON object per line of the CLI's input, as `python -m nanohuatuo.sampling` writes):
    {"id": str,
     "question": str | [{"role": "user"|"assistant"|"system", "content": str}, ...],
     "reference": str,          # the real doctor's reply
     "answers": [str, ...],     # K answers sampled from the SFT model
     "finished": [bool, ...]}   # optional: False = cut by max_new_tokens

Answers ranked: one cut by max_new_tokens (finished False) is dropped, never
ranked as if complete (or, with truncated="last" / --truncated last, judged and
then ranked below every finished answer), and an answer identical (after
stripping) to an earlier one, or to the doctor's reply in mixed mode, is judged
once. Both are counted and said in the summary; an item left with fewer than 2
answers to rank is skipped.

Judge result per item:
    {"id": str, "ranking": [int, ...] | None, "raw": str, "cached": bool,
     "dropped": {"duplicate": int, "truncated": int}}
    `ranking` holds indices into `answers`, best first, covering every judged
    answer (all answers minus the dropped ones); None means no usable ranking
    ("error" says why: the judge's reason, a rejected request, or a skipped item;
    `raw` keeps the judge's last reply). `cached` is True when every call was
    served from the cache.
    mixed=True (HuatuoGPT's mixed feedback) makes the doctor's reply one more
    ranked answer: index K (= len(answers)) in `ranking` is the doctor's reply, and
    the result also has "reference_rank", the doctor's 0-based place (0 = best)
    or None.

Judge reply format (stated in the prompt, checked by `parse_ranking`):
    brief reasoning, then a final line with the answer numbers as shown,
    best first, each exactly once:
        排名：3 > 1 > 2
    Label variants (排名为：, 最终排名如下： with the ranking on the next line,
    排序结果：, Final ranking is:) and a JSON object {"ranking": [3, 1, 2]} are
    accepted too, as are full-width characters (＞ ： ，), code fences, markdown
    bold, "回答3"-style labels and "," or "、" instead of ">". Ties ("=") are not
    supported: they yield None. A reply without a valid ranking is followed up
    with a nudge, up to `parse_attempts` asks; then the item counts as unusable
    ("no ranking line") and the run goes on.

Preference record (what `rankings_to_preferences` returns, one per usable item):
    {"id", "prompt": <question str or messages>, "reference", "answers": [best, ..., worst]}
    With mixed feedback the doctor's reply is one of the ranked answers and the
    record also has "reference_index": its position in `answers`. It is not an
    SFT sample, so the reward model's score statistics (bias, spread) must skip
    answers[reference_index].
"""


import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

from .cli import UserError, arg, config_from, endpoint_flags, guarded, make_parser, parse_args
from .data import DataError, iter_jsonl, write_jsonl
from .llm import LLM, LLMError
# the prompt's names stay importable from here, where callers and tests have always found them
from .rank_prompt import (NO_RANKING, RANKING_CRITERIA, ROLE_NAMES, SYSTEM_PROMPT,  # noqa: F401
                          build_judge_messages, format_dialogue, nudge_message, ranked_texts, shown_order,
                          parse_ranking, ranking_parser)
from .textmetrics import similarity_score

# ------------------------------------------------------------- item checking

def check_item(item: dict, mixed: bool = False) -> None:
    """Raise ValueError naming the item and field when an item is malformed."""
    where = f"item {item.get('id')!r}" if isinstance(item, dict) else "an item"
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
    finished = item.get("finished")
    if finished is not None and not (isinstance(finished, list) and len(finished) == len(answers)
                                     and all(isinstance(f, bool) for f in finished)):
        raise ValueError(f"{where}: 'finished' must be one true/false per answer "
                         f"({len(answers)} answers)")
    if len(answers) + mixed < 2:
        raise ValueError(f"{where}: needs at least 2 answers to rank, got {len(answers) + mixed}; "
                         "sample more answers per prompt")


# -------------------------------------------------------- choosing the answers to rank

MIN_RANKED = 2


TRUNCATED = ("drop", "last")  # what happens to an answer cut by max_new_tokens


def judged_answers(item: dict, mixed: bool = False, truncated: str = "drop") -> tuple[list[int], Counter]:
    """Indices of the answers the judge sees, and what was left out: {"truncated": n, "duplicate": n}.

    An answer cut by max_new_tokens would be ranked as if complete, and two identical answers
    make a preference pair with nothing to learn (and a judge forced to order equals).
    truncated="last" keeps cut answers for the judge (not counted as left out); the judges then
    rank them below every complete one."""
    if truncated not in TRUNCATED:
        raise ValueError(f"truncated={truncated!r}; use one of {TRUNCATED}")
    finished = item.get("finished") or [True] * len(item["answers"])
    seen = {item["reference"].strip()} if mixed else set()
    kept, dropped = [], Counter(truncated=0, duplicate=0)
    for i, (answer, done) in enumerate(zip(item["answers"], finished)):
        if not done and truncated == "drop":
            dropped["truncated"] += 1
        elif answer.strip() in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(answer.strip())
            kept.append(i)
    return kept, dropped


def judged_view(item: dict, kept: list[int]) -> dict:
    """The item as the judge sees it: only the kept answers (ranking indices map back via kept)."""
    return {**item, "answers": [item["answers"][i] for i in kept]}


class Selection:
    """The answers judged for every item, with the totals the summary reports."""

    def __init__(self, items: list[dict], mixed: bool, truncated: str = "drop"):
        for item in items:
            check_item(item, mixed)
        self.mixed, self.truncated = mixed, truncated
        self.kept, self.item_dropped, self.dropped, self.skipped = [], [], Counter(truncated=0, duplicate=0), 0
        self.cut = []  # per item: the kept answers that were cut by max_new_tokens (truncated="last")
        for item in items:
            kept, dropped = judged_answers(item, mixed, truncated)
            finished = item.get("finished") or [True] * len(item["answers"])
            self.cut.append({i for i in kept if not finished[i]})
            self.kept.append(kept)
            self.item_dropped.append(dict(dropped))
            self.dropped.update(dropped)
            self.skipped += len(kept) + mixed < MIN_RANKED

    def judged(self, j: int) -> bool:
        return len(self.kept[j]) + self.mixed >= MIN_RANKED

    def result(self, item: dict, j: int, shown_ranking: list[int] | None, raw: str, cached: bool,
               error: str | None = None) -> dict:
        """A judge result, its ranking mapped from judged positions back to indices of item["answers"]."""
        k, kept = len(item["answers"]), self.kept[j]
        back = kept + [k]  # judged position -> index; the doctor's reply (mixed) is last
        ranking = None if shown_ranking is None else [back[p] for p in shown_ranking]
        if ranking is not None and self.cut[j]:  # an unfinished answer is never better than a finished one
            ranking = [i for i in ranking if i not in self.cut[j]] + [i for i in ranking if i in self.cut[j]]
        result = {"id": item["id"], "ranking": ranking, "raw": raw, "cached": cached,
                  "dropped": self.item_dropped[j]}
        if error is not None:
            result["error"] = error
        elif not self.judged(j):
            result["error"] = f"skipped: fewer than {MIN_RANKED} distinct complete answers"
        if self.mixed:
            result["reference_rank"] = ranking.index(k) if ranking is not None else None
        return result

    def summary(self, name: str) -> str:
        n, cut = len(self.kept), sum(map(len, self.cut))
        last = f", ranked {cut} cut answers last" if self.truncated == "last" else ""
        return (f"{name}: {n} items; left out {self.dropped['duplicate']} repeated answers and "
                f"{self.dropped['truncated']} answers cut by max_new_tokens{last}; {self.skipped} items skipped "
                f"(fewer than {MIN_RANKED} answers left)")


# ---------------------------------------------------------------- endpoint ranker

JudgeError = LLMError  # the judge's endpoint refused or is gone (bad key, unknown model, server down)


class EndpointRanker:
    """Ranks answers with an LLM behind an OpenAI-compatible chat completions API, through llm.LLM.

    Every reply is stored in a SQLite cache (cache_path=None turns it off), so an interrupted or
    repeated run re-sends nothing it already has; the `openai` client retries connection errors,
    timeouts, 429 and 5xx itself (max_retries); a bad key or unknown model raises JudgeError at
    once; a reply without a valid ranking is followed up with a nudge, up to parse_attempts asks,
    then the item is unusable and counted, and the run goes on.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 cache_path=None, concurrency: int = 4, timeout: float = 60.0, max_retries: int = 5,
                 temperature: float = 0.0, max_tokens: int = 1024, parse_attempts: int = 3, seed: int = 0,
                 progress_every: float = 5.0, refresh_unusable: bool = False, truncated: str = "drop"):
        base_url = (base_url or os.environ.get("NANOHUATUO_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                    or "https://api.openai.com/v1")
        model = model or os.environ.get("NANOHUATUO_JUDGE_MODEL")
        if not model:
            raise UserError("no judge model given; pass --judge-model-name (model=...) or set NANOHUATUO_JUDGE_MODEL, "
                            "or use --judge offline")
        self.llm = LLM(base_url, model, api_key=api_key, cache=cache_path, concurrency=concurrency,
                       max_retries=max_retries, timeout=timeout, attempts=parse_attempts,
                       refresh_unusable=refresh_unusable, name="judge", progress_every=progress_every)
        self.base_url, self.model = self.llm.base_url, model
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.seed, self.truncated = seed, truncated

    @property
    def usage(self):
        return self.llm.usage

    def summary(self) -> str:
        return self.llm.summary()

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rank(self, items: list[dict], mixed: bool = False) -> list[dict]:
        """Judge every item; results come back in item order (see the module docstring)."""
        sel = Selection(items, mixed, self.truncated)
        todo = [j for j in range(len(items)) if sel.judged(j)]
        requests, parses, followups, orders = [], [], [], []
        for j in todo:
            view = judged_view(items[j], sel.kept[j])
            n = len(view["answers"]) + mixed
            order = shown_order(items[j]["id"], n, self.seed)
            requests.append({"messages": build_judge_messages(view, order, mixed), **self.params})
            parses.append(ranking_parser(n))
            # nudge rather than resend: at temperature 0 the same request returns the same text
            followups.append(lambda messages, text, reason, n=n:
                             messages + [{"role": "assistant", "content": text}, nudge_message(n)])
            orders.append(order)
        answers = self.llm.map(requests, parse=parses, followup=followups, desc="judge")
        results = [sel.result(item, j, None, "", False) for j, item in enumerate(items)]
        for j, order, a in zip(todo, orders, answers):
            shown = [order[p] for p in a.value] if a.ok else None
            results[j] = sel.result(items[j], j, shown, a.text or "", a.cached, None if a.ok else a.error)
        print(sel.summary("judge"), file=sys.stderr)
        print(self.summary(), file=sys.stderr)
        return results


# --------------------------------------------------------------- offline ranker

class OfflineRanker:
    """Ranks answers by textmetrics.similarity_score against the doctor's reply (character-bigram F1
    minus repetition and length penalties; evaluation's offline judge uses the same score); no
    network, deterministic.

    Ties go to the lower answer index. With mixed=True the doctor's reply is
    ranked too and, matching itself, always ranks first. The answers are chosen as for the
    endpoint ranker (no repeats, no answers cut by max_new_tokens).
    """

    def __init__(self, truncated: str = "drop"):
        self.truncated = truncated

    def rank(self, items: list[dict], mixed: bool = False) -> list[dict]:
        sel = Selection(items, mixed, self.truncated)
        results = []
        for j, item in enumerate(items):
            if not sel.judged(j):
                results.append(sel.result(item, j, None, "", False))
                continue
            scores = [similarity_score(c, item["reference"]) for c in ranked_texts(judged_view(item, sel.kept[j]), mixed)]
            ranking = sorted(range(len(scores)), key=lambda i: (-round(scores[i], 12), i))
            raw = "offline scores: " + json.dumps([round(s, 4) for s in scores])
            results.append(sel.result(item, j, ranking, raw, False))
        print(sel.summary("offline judge"), file=sys.stderr)
        return results


# ------------------------------------------------------------ preference data

def rankings_to_preferences(items: list[dict], results: list[dict]) -> list[dict]:
    """Preference records (answers best first) for every usable ranking; unusable ones are dropped.

    `results` must be what a judge's rank(items) returned: same length and order. A ranking
    holding index K (= len(answers)) is mixed feedback: the record then marks where the doctor's
    reply is, as "reference_index"."""
    if len(items) != len(results):
        raise ValueError(f"{len(items)} items but {len(results)} judge results; "
                         "pass the results of judge.rank(items) for the same items")
    records, dropped = [], Counter()
    for item, result in zip(items, results):
        if result["id"] != item["id"]:
            raise ValueError(f"judge result {result['id']!r} does not match item {item['id']!r}; "
                             "keep results in the order rank() returned them")
        ranking = result["ranking"]
        if ranking is None:
            dropped[(result.get("error") or NO_RANKING).split(":")[0]] += 1
            continue
        k = len(item["answers"])
        if len(set(ranking)) != len(ranking) or not all(isinstance(i, int) and 0 <= i <= k for i in ranking) \
                or len(ranking) < 2:
            raise ValueError(f"item {item['id']!r}: ranking {ranking} is not an order of distinct answer "
                             f"indices 0..{k - 1} (and {k} for the doctor's reply)")
        texts = ranked_texts(item, mixed=True)
        record = {"id": item["id"], "prompt": item["question"], "reference": item["reference"],
                  "answers": [texts[i] for i in ranking]}
        if k in ranking:
            record["reference_index"] = ranking.index(k)
        records.append(record)
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
    print(f"feedback: kept {len(records)} preference records, dropped {sum(dropped.values())} items without a "
          f"ranking{f' ({why})' if why else ''}", file=sys.stderr)
    return records


# ----------------------------------------------------------------------- CLI

@dataclass
class RankConfig(endpoint_flags("judge", "judge", old={"base_url": ("--base-url",),
                                                       "model_name": ("--model-name", "--model"),
                                                       "api_key": ("--api-key",)})):
    data: str = arg("", "JSONL of judge items {id, question, reference, answers[, finished]}, as "
                        "`python -m nanohuatuo.sampling` writes them", metavar="FILE", old=("--in",))
    out: str = arg("", "JSONL of preference records to write", metavar="FILE")
    judge: str = arg("endpoint", "who ranks: endpoint (--judge-base-url, default $NANOHUATUO_JUDGE_BASE_URL, "
                                 "$OPENAI_BASE_URL, then https://api.openai.com/v1; --judge-model-name, default "
                                 "$NANOHUATUO_JUDGE_MODEL), or offline (similarity to the doctor's reply, no network)",
                     choices=["endpoint", "offline"], old_values={"openai": "endpoint"})
    cache: str = arg("runs/judge_cache.sqlite", "SQLite cache of the judge's replies; a rerun resumes from it")
    refresh_unusable: bool = arg(False, "ask again the items whose cached replies gave no usable ranking")
    concurrency: int = arg(4, "judge requests in flight at once", bounds="[1, inf)")
    timeout: float = arg(60.0, "seconds per judge request", bounds="(0, inf)")
    max_retries: int = arg(5, "client retries of a request after connection errors, timeouts, 429 and 5xx",
                           retired="--attempts for re-asks of unusable replies (the client's own retries stay 5)",
                           bounds="[0, inf)")
    attempts: int = arg(3, "asks per item (the first, then nudges) before it counts as unusable", bounds="[1, inf)")
    mixed: bool = arg(False, "rank the doctor's reply among the answers (HuatuoGPT's mixed feedback)")
    truncated: str = arg("drop", "answers cut by max_new_tokens: drop them, or rank them last (below every "
                                 "finished answer)", choices=list(TRUNCATED))
    seed: int = arg(0, "seed of the per-item shuffle of the answers shown to the judge")


def read_items(path: str, mixed: bool = False) -> list[dict]:
    """Judge items from a JSONL file; errors name the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file; pass a JSONL of judge items "
                        "(`python -m nanohuatuo.sampling` writes them)")
    items = []
    for lineno, row in iter_jsonl(path):
        try:
            check_item(row, mixed)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        items.append(row)
    if not items:
        raise DataError(f"{path}: no judge items (the file is empty); sample answers first with "
                        "`python -m nanohuatuo.sampling`")
    return items


def rank_command(cfg: RankConfig) -> int:
    if not cfg.data or not cfg.out:
        raise UserError("feedback rank needs --data (judge items) and --out (preference records)")
    if os.path.isdir(cfg.out):  # known before the judge is paid, not after
        raise UserError(f"--out {cfg.out} is a directory; give the JSONL file to write")
    items = read_items(cfg.data, cfg.mixed)
    if cfg.judge == "offline":
        results = OfflineRanker(cfg.truncated).rank(items, mixed=cfg.mixed)
    else:
        with EndpointRanker(base_url=cfg.judge_base_url, model=cfg.judge_model_name, api_key=cfg.judge_api_key,
                         cache_path=cfg.cache or None, concurrency=cfg.concurrency, timeout=cfg.timeout,
                         max_retries=cfg.max_retries, parse_attempts=cfg.attempts, seed=cfg.seed,
                         refresh_unusable=cfg.refresh_unusable, truncated=cfg.truncated) as judge:
            results = judge.rank(items, mixed=cfg.mixed)
    records = rankings_to_preferences(items, results)
    if not records:  # the line above says why; an empty file would only fail later, in train_rm.py
        raise UserError(f"no usable ranking among the {len(items)} judge items of {cfg.data}; nothing written "
                        f"to {cfg.out}")
    n = write_jsonl(cfg.out, records)
    print(f"feedback: wrote {n} records to {cfg.out}", file=sys.stderr)
    return 0


USAGE = "usage: python -m nanohuatuo.feedback {rank} --data SAMPLES.jsonl --out PREFS.jsonl [options]  (rank --help)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[0], file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] != "rank":
        print(f"error: unknown command {argv[0]!r}; {USAGE}", file=sys.stderr)
        return 2
    parser = make_parser(RankConfig, prog="python -m nanohuatuo.feedback rank",
                         description="Rank sampled answers with a judge and write preference data.")
    return guarded(lambda: rank_command(config_from(RankConfig, parse_args(parser, RankConfig, argv[1:]))))


if __name__ == "__main__":
    sys.exit(main())
