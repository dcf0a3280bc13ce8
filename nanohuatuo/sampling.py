"""Sampling K answers per prompt, which the AI judge ranks (RLAIF step 1).

    items = sample_answers(model, tok, template, prompts, k=4)        # our model, on the engine
    items = sample_from_endpoint(llm, prompts, k=4)                   # any OpenAI-compatible server

    python -m nanohuatuo.sampling --model SFT_DIR [--adapter DIR] --prompts PROMPTS.jsonl --k 4 \\
        --out SAMPLES.jsonl [--max-new-tokens 256 --temperature 0.7 --batch-size 16 --seed 0 ...]
    python -m nanohuatuo.sampling --base-url http://127.0.0.1:8000/v1 --model-name NAME \\
        --prompts PROMPTS.jsonl --k 4 --out SAMPLES.jsonl [--cache FILE --concurrency 8 ...]

PROMPTS.jsonl holds prompt records `{"id", "messages" (ending with a user turn), "reference"}`
(`python data.py prompts`) or schema conversations, which are turned into prompt
records with `data.to_prompt` (the last assistant turn becomes the reference).

Each output line is a judge item for `python -m nanohuatuo.feedback rank`:
    {"id", "question": messages, "reference": the doctor's reply, "answers": [k sampled answers],
     "finished": [k bools]}
`finished[j]` is False when answer j was cut by max_new_tokens (finish reason "length") instead
of ending on the end token or a stop string; the judge leaves such answers out.

Our model: one `engine.Engine` for the whole run; each prompt goes in as `add(ids, params, n=k)`,
so its k samples share one prefill, and a finished row takes the next prompt at once. Prompt i's
samples are seeded by (seed, its id) alone, so the answers do not depend on --batch-size, on the
order of the prompts or on a resume (up to float rounding, which can flip a near-tie: engine.py).
Answers are cut before a stop string. A prompt longer than context - max_new_tokens loses its
oldest turns (the system message and the last question are kept: templates.fit_prompt, as chat
and evaluation fit theirs); one that still does not fit is skipped and named. Sampling settings
not given as flags come from generation_config.json (the adapter's, else the model's), else
temperature 0.7, top_p 1, no top_k.

An endpoint (vLLM, our serve.py, a cloud model) gets one request per prompt with n=k (topped up
with single requests if the server returns fewer choices), through `llm.LLM`: cached, bounded,
retried; a prompt whose replies stay unusable is skipped and counted.

The output file is rewritten atomically every half minute and at the end; a rerun with the same
--out skips the ids already there, so an interrupted run resumes.
"""

import hashlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass

from .cli import (GenerationFlags, ModelFlags, UserError, arg, cli_main, endpoint_flags, like, resolve_device,
                  resolve_dtype)
from .data import DataError, check_messages, iter_jsonl, read_jsonl, split_prompt, to_prompt, write_jsonl
from .engine import Engine, SamplingParams
from .generate import cut_at_stop, load_for_inference
from .llm import LLM, cache_file, from_flags
from .templates import PromptTooLong, fit_prompt, generation_defaults, prompt_budget, stop_strings, stop_token_ids

SAVE_EVERY_S = 30.0  # how often the CLI rewrites --out with what it has so far
PRINT_EVERY_S = 10.0
DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The seed of one prompt's samples: a function of the run's seed and the prompt id only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "big") % 2**62


def answer_text(tok, tokens: list[int], stops) -> str:
    """The answer as text: special tokens (the end token) skipped, cut before a stop string."""
    return cut_at_stop(tok.decode(tokens), stops).strip()


def judge_item(prompt: dict, answers: list[str], finished: list[bool]) -> dict:
    return {"id": prompt["id"], "question": prompt["messages"], "reference": prompt["reference"],
            "answers": answers, "finished": finished}


class Progress:
    """`sampling: done/total prompts | cut answers | tok/s | eta` about every 10 s and at the end."""

    def __init__(self, total: int, k: int):
        self.total, self.k, self.done, self.cut, self.tokens = total, k, 0, 0, 0
        self.t0, self.last = time.time(), 0.0

    def add(self, finished: list[bool], tokens: int = 0) -> None:
        self.done += 1
        self.cut += finished.count(False)
        self.tokens += tokens

    def show(self, force: bool = False) -> None:
        elapsed = time.time() - self.t0
        if not force and elapsed - self.last < PRINT_EVERY_S:
            return
        self.last = elapsed
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        speed = f" | {self.tokens / max(elapsed, 1e-9):.0f} tok/s" if self.tokens else ""
        # many answers cut at the length limit: raise max_new_tokens, or the judge has few to rank
        print(f"sampling: {self.done}/{self.total} prompts | {self.cut}/{self.done * self.k} answers hit "
              f"max_new_tokens{speed} | eta {eta / 60:.1f} min", flush=True)


def sample_answers(model, tok, template, prompts: list[dict], k: int = 4, max_new_tokens: int = 256,
                   temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                   batch_size: int = 16, seed: int = 0, context: int = 2048, extra_stop_ids=(),
                   compile: bool = False, on_batch=None) -> list[dict]:
    """Judge items with k sampled answers for each prompt record, in prompt order (see module doc).

    batch_size: sequences decoded together (the engine's slots, at least k). on_batch(new_items)
    is called as items complete, in prompt order (the CLI saves progress there)."""
    if k < 1:
        raise ValueError(f"sample_answers: k={k}; need at least one answer per prompt (the judge needs 2+)")
    if temperature <= 0 and k > 1:
        print(f"sampling: temperature {temperature} is greedy: the {k} answers of a prompt will be identical "
              "(the judge keeps one); sample with temperature > 0", flush=True)
    stops = stop_strings(template)
    stop_ids = tuple(sorted(set(stop_token_ids(tok, template)) | set(extra_stop_ids)))
    context = min(context, model.config.max_seq_len)
    budget = prompt_budget(model.config.max_seq_len, context, max_new_tokens)
    fitted, skipped = [], []
    for p in prompts:
        try:
            fitted.append((p, fit_prompt(p["messages"], tok, template, budget)))
        except PromptTooLong:
            skipped.append(p)
    if skipped:
        names = ", ".join(repr(p["id"]) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"sampling: skipped {len(skipped)} prompts whose last question alone is longer than {budget} "
              f"tokens ({names}); raise --max-len or lower --max-new-tokens", flush=True)
    if not fitted:
        return []
    max_len = min(context, max(len(ids) for _, ids in fitted) + max_new_tokens)
    eng = Engine(model, tokenizer=tok, slots=max(batch_size, k), max_len=max_len, compile=compile)
    queue = deque(enumerate(fitted))
    owner, tokens, reasons = {}, {}, {}  # rid -> prompt index; rid -> new tokens; rid -> finish reason
    rids_of, left = {}, {}  # prompt index -> its k rids; -> samples still running
    ready, items, next_out = {}, [], 0
    progress, outstanding = Progress(len(fitted), k), 0
    while queue or eng.has_work():
        # keep about two batches' worth of samples queued, so a freed row never waits for Python
        while queue and outstanding < 2 * eng.slots:
            i, (p, ids) = queue.popleft()
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    repetition_penalty=repetition_penalty, stop_ids=stop_ids,
                                    stop_strings=tuple(stops), seed=prompt_seed(seed, p["id"]))
            rids = eng.add(ids, params, n=k)
            rids_of[i], left[i] = rids if isinstance(rids, list) else [rids], k
            for rid in rids_of[i]:
                owner[rid], tokens[rid] = i, []
            outstanding += k
        for ev in eng.step():
            if ev.token is not None:
                tokens[ev.rid].append(ev.token)
            if ev.finish_reason is None:
                continue
            reasons[ev.rid] = ev.finish_reason
            i = owner[ev.rid]
            left[i] -= 1
            outstanding -= 1
            if left[i] == 0:
                rids = rids_of.pop(i)
                finished = [reasons.pop(r) == "stop" for r in rids]
                rows = [tokens.pop(r) for r in rids]
                progress.add(finished, sum(len(t) for t in rows))
                answers = [answer_text(tok, t, stops) for t in rows]
                ready[i] = judge_item(fitted[i][0], answers, finished)
        new = []
        while next_out in ready:  # hand items out in prompt order
            new.append(ready.pop(next_out))
            next_out += 1
        if new:
            items += new
            if on_batch is not None:
                on_batch(new)
            progress.show(force=next_out == len(fitted))
    return items


def sample_from_endpoint(llm: LLM, prompts: list[dict], k: int = 4, max_new_tokens: int = 256,
                         temperature: float = 0.7, top_p: float = 1.0, top_k: int | None = None,
                         repetition_penalty: float | None = None, seed: int = 0, on_batch=None) -> list[dict]:
    """Judge items with k answers per prompt from an OpenAI-compatible endpoint (see module doc).

    top_k and repetition_penalty are not OpenAI parameters: when given they are sent as extra
    body fields, which vLLM and our serve.py read."""
    extra = {name: v for name, v in (("top_k", top_k), ("repetition_penalty", repetition_penalty)) if v is not None}
    params = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
              **({"extra_body": extra} if extra else {})}
    answers = llm.map([{"messages": p["messages"], "n": k, "seed": prompt_seed(seed, p["id"]), **params}
                       for p in prompts], desc="sampling")
    # a server that ignores n (or returns fewer choices) is topped up with single seeded requests
    short = [(i, j) for i, a in enumerate(answers) if a.ok for j in range(len(a.texts), k)]
    extra_answers = llm.map([{"messages": prompts[i]["messages"], "n": 1,
                              "seed": prompt_seed(seed, f"{prompts[i]['id']}#{j}"), **params} for i, j in short],
                            desc="sampling (top-up)") if short else []
    got = {i: (list(a.texts[:k]), list(a.finish_reasons[:k])) for i, a in enumerate(answers) if a.ok}
    for (i, _), a in zip(short, extra_answers):
        if a.ok:
            got[i][0].append(a.texts[0])
            got[i][1].append(a.finish_reasons[0] if a.finish_reasons else None)
    items, lost = [], 0
    for i, p in enumerate(prompts):
        texts, reasons = got.get(i, ([], []))
        if len(texts) < k:
            lost += 1
            continue
        # "length" (and a filtered answer) is a cut answer; a server that gives no reason is trusted
        items.append(judge_item(p, [t.strip() for t in texts], [r not in ("length", "content_filter")
                                                                 for r in reasons]))
    if lost:
        print(f"sampling: skipped {lost} prompts without {k} usable answers from {llm.base_url} "
              "(see the summary below; --refresh-unusable asks again)", flush=True)
    if on_batch is not None and items:
        on_batch(items)
    return items


def read_prompts(path) -> list[dict]:
    """Prompt records from a file of prompt records or of schema conversations (see module doc)."""
    prompts, lines = [], {}
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if isinstance(row, dict) and "reference" in row:
            if "id" not in row:
                raise DataError(f"{where}: a prompt record needs 'id', 'messages' (ending with a user turn) "
                                f"and 'reference'; make it with `python data.py prompts`")
            check_messages(row.get("messages"), where, last="user")
            if not isinstance(row["reference"], str):
                raise DataError(f"{where}: 'reference' must be a string (the doctor's reply)")
            prompts.append(row)
        else:
            _, reference = split_prompt(row, where)  # checks the conversation, names what is wrong
            if reference is None:
                raise DataError(f"{where}: no reference to judge the answers against: a prompt record needs "
                                f"'reference' (the doctor's reply), a conversation must end with it")
            prompts.append(to_prompt(row))
        pid = prompts[-1]["id"]
        if pid in lines:  # answers are seeded and resumed by id: two prompts of one id would share them
            raise DataError(f"{where}: id {pid!r} was already used on line {lines[pid]}")
        lines[pid] = lineno
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty); make them with `python data.py prompts`")
    return prompts


# ----------------------------------------------------------------------- CLI

@dataclass
class SampleConfig(GenerationFlags, endpoint_flags("", "instead of --model"), ModelFlags):
    data: str = arg("", "prompts, JSONL of prompt records or conversations (python data.py prompts)",
                    metavar="FILE", old=("--prompts",))
    out: str = arg("", "JSONL of judge items to write; a rerun with the same --out samples only the missing "
                       "prompts", metavar="FILE")
    model: str = like(ModelFlags, "model", help="SFT model directory (Hugging Face layout); or --base-url for an "
                                                "endpoint")
    adapter: str | None = arg(None, "LoRA adapter directory (PEFT layout, e.g. the SFT output), merged before "
                                    "sampling; its chat template, if it has one, is used")
    cache: str = arg("", "SQLite cache of the endpoint's replies, so a rerun pays for nothing twice (with "
                         "--base-url; default: <out>.cache.sqlite; 'none': off)")
    refresh_unusable: bool = arg(False, "with --base-url: ask again the prompts whose cached replies were "
                                        "unusable")
    concurrency: int = arg(4, "requests in flight at once (with --base-url)", bounds="[1, inf)")
    k: int = arg(4, "answers per prompt", bounds="[1, inf)")
    max_new_tokens: int = like(GenerationFlags, "max_new_tokens", help="new tokens per answer; longer answers are "
                                                                       "marked unfinished")
    repetition_penalty: float | None = arg(None, "repetition penalty (default: generation_config.json, "
                                                 "else 1.0: off)", bounds="(0, inf)")
    batch_size: int = arg(16, "sequences decoded together (engine slots; at least --k)", bounds="[1, inf)")
    seed: int = arg(0, "random seed; a prompt's answers depend only on it and the prompt id")
    max_len: int = arg(2048, "prompt + answer token budget (capped at the model's max_seq_len)", old=("--context",),
                       bounds="[1, inf)")
    compile: bool = arg(False, "torch.compile the decode step (CUDA graphs on CUDA; fused element-wise ops on CPU)")
    limit: int | None = arg(None, "only the first N prompts", bounds="[1, inf)")


def run(cfg: SampleConfig) -> int:
    if not cfg.data or not cfg.out:
        raise UserError("sampling needs --data (prompt records) and --out (judge items to write)")
    if bool(cfg.model) == bool(cfg.base_url):
        raise UserError("sampling needs either --model (a model directory) or --base-url with --model-name "
                        "(an OpenAI-compatible endpoint)")
    if cfg.k < 1 or cfg.max_new_tokens < 1:
        raise UserError(f"--k {cfg.k} and --max-new-tokens {cfg.max_new_tokens} must be at least 1")
    prompts = read_prompts(cfg.data)[:cfg.limit]
    done = read_jsonl(cfg.out) if os.path.exists(cfg.out) else []
    seen = {row.get("id") for row in done}
    todo = [p for p in prompts if p["id"] not in seen]
    if done:
        print(f"sampling: {cfg.out} already has {len(done)} items; sampling the other {len(todo)} prompts")
    last_save = [time.time()]

    def save(new):
        done.extend(new)
        if time.time() - last_save[0] > SAVE_EVERY_S:
            write_jsonl(cfg.out, done)
            last_save[0] = time.time()

    try:
        _sample(cfg, todo, save)
    except KeyboardInterrupt:  # Ctrl-C: what was answered is written before leaving, not redone on the rerun
        if done:
            write_jsonl(cfg.out, done)
        print(f"sampling: interrupted; {len(done)} items written to {cfg.out}, a rerun samples the rest",
              file=sys.stderr, flush=True)
        raise
    if not done:  # every prompt was skipped (the lines above say why): an empty file would fail later, in feedback
        raise UserError(f"no prompt of {cfg.data} could be answered; nothing written to {cfg.out}")
    n = write_jsonl(cfg.out, done)
    print(f"sampling: wrote {n} items to {cfg.out}")
    return 0


def _sample(cfg, todo, save):
    """Answers to `todo` from the endpoint or the model, handed to save() batch by batch."""
    given = {name: getattr(cfg, name) for name in DEFAULTS if getattr(cfg, name) is not None}
    if cfg.base_url:
        settings = {**DEFAULTS, **given}
        with from_flags(cfg, cache=cache_file(cfg.cache, f"{cfg.out}.cache.sqlite"), name="sampling") as llm:  # a missing --model-name is said first
            print(f"sampling: {len(todo)} prompts x {cfg.k} answers from {cfg.model_name} at {cfg.base_url}",
                  flush=True)
            sample_from_endpoint(llm, todo, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                 temperature=settings["temperature"], top_p=settings["top_p"],
                                 top_k=given.get("top_k"), repetition_penalty=given.get("repetition_penalty"),
                                 seed=cfg.seed, on_batch=save)
            print(llm.summary(), flush=True)
    else:
        model_defaults = generation_defaults(cfg.model, cfg.adapter or None)
        settings = {**DEFAULTS, **{n: v for n, v in model_defaults.items() if n in DEFAULTS}, **given}
        device = resolve_device(cfg.device)
        # the adapter merged (sampling then costs what the base does); an SFT output's own tokenizer and
        # chat template win (templates.tokenizer_and_template)
        model, tok, template = load_for_inference(cfg.model, cfg.adapter, resolve_dtype(cfg.dtype, device), device,
                                                  template=cfg.template, what="sampling")
        print(f"sampling: {len(todo)} prompts x {cfg.k} answers, template {template}, device "
              f"{model.embed_tokens.weight.device}, " + ", ".join(f"{n} {v}" for n, v in settings.items()), flush=True)
        sample_answers(model, tok, template, todo, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, seed=cfg.seed, context=cfg.max_len,
                       extra_stop_ids=model_defaults.get("stop_ids", ()), compile=cfg.compile, on_batch=save,
                       **settings)


def main(argv=None) -> int:
    return cli_main(run, SampleConfig, argv, prog="python -m nanohuatuo.sampling",
                    description="Sample K answers per prompt (our model or an OpenAI-compatible endpoint) "
                                "for the AI judge.")


if __name__ == "__main__":
    sys.exit(main())
