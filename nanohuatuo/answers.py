"""Candidates and their answers: one side of a comparison (one of our models on the engine, an
OpenAI-compatible endpoint, or a file of answers) answering conversations, each answer kept once.

- Candidate names the side (exactly one of model, endpoint, answers file); GenerationSettings its
  decoding (max_new_tokens, temperature, top_p, top_k, seed, system).
- AnswerStore: one JSONL per candidate, keyed by item id and prompt hash, appended as answers come
  (a torn last line is cut off); candidate_key names the file after what produced the answers
  (model and adapter files with their sizes and mtimes, template, sampling), so retraining in
  place makes new answers and every comparison pointing at the same directory reuses old ones.
- LocalModel answers in batches on the engine (prompts fitted to the context, a seed per answer;
  with keep_prefixes, one engine for the run that keeps finished answers' keys: a consultation's
  next turn, or a question under the same system prompt, prefills only what it adds); EndpointModel
  through llm.LLM with a SQLite cache; get_answers ties them together.
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import templates
from .cli import UserError
from .evalsets import read_records
from .llm import from_flags, role_cache, slug


@dataclass
class Candidate:
    """One side of a comparison: our model, an endpoint, or a file of answers (exactly one)."""
    name: str = ""
    model: str = ""
    adapter: str | None = None
    base_url: str = ""
    model_name: str = ""
    api_key: str | None = None
    answers: str = ""
    template: str = "auto"
    quant: str = "none"  # our model's weights as loaded: none, int8 or nf4 (quant.INFERENCE_QUANTS)
    side: str = ""  # "A" or "B" where both candidates of a comparison have one label: said after it

    def kind(self, flag: str = "") -> str:
        kinds = [k for k, on in (("model", self.model), ("endpoint", self.base_url or self.model_name),
                                 ("answers", self.answers)) if on]
        who = f"candidate {flag.rstrip('-') or self.name}" if flag or self.name else "the model to evaluate"
        if len(kinds) != 1:
            what = " and ".join(kinds) if kinds else "nothing"
            raise UserError(f"{who}: got {what}; give exactly one of --{flag}model DIR, "
                            f"--{flag}base-url URL with --{flag}model-name NAME, or --{flag}answers FILE")
        if self.quant != "none" and kinds[0] != "model":
            raise UserError(f"--{flag}quant {self.quant}: only our model (--{flag}model) is loaded here; an endpoint "
                            f"or a file of answers has its weights elsewhere")
        if kinds[0] == "endpoint" and not (self.base_url and self.model_name):
            raise UserError(f"{who}: an endpoint needs "
                            f"--{flag}base-url URL and --{flag}model-name NAME (GET URL/models lists the names)")
        if kinds[0] == "model" and not Path(self.model).is_dir():
            raise UserError(f"--{flag}model {self.model}: no such directory (a model in the Hugging Face layout)")
        return kinds[0]

    def label(self) -> str:
        """The name in reports and progress lines: "merged", or "merged (A)" beside another "merged"."""
        return self.own_label() + (f" ({self.side})" if self.side else "")

    def own_label(self) -> str:
        """The name without the side: what names the stored answers and seeds the sampled ones, so they do not
        depend on the other candidate (its own key tells two models of one name apart)."""
        if self.name:
            return self.name
        if self.model:  # a quantised copy named apart from the model it comes from
            return Path(self.adapter or self.model).name + (f"-{self.quant}" if self.quant != "none" else "")
        return self.model_name or Path(self.answers).stem


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    system: str = ""


def _files_fingerprint(directory: str | None) -> list:
    """Name, size and mtime of a model directory's weight and config files: retraining in place
    into the same directory makes new answers instead of reusing stale ones."""
    if not directory:
        return []
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{directory}: not a model directory")
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.iterdir())
            if p.suffix in (".safetensors", ".bin", ".json", ".model")]


def candidate_key(c: Candidate, s: GenerationSettings, extra: dict | None = None) -> str:
    """File stem for the candidate's answers: its label and a hash of what produced them."""
    kind = c.kind()
    if kind == "model":
        what = {"model": str(Path(c.model).resolve()), "adapter": str(Path(c.adapter).resolve()) if c.adapter else None,
                "files": _files_fingerprint(c.model) + _files_fingerprint(c.adapter), "template": c.template}
        if c.quant != "none":  # (answers stored before the flag keep their key)
            what["quant"] = c.quant
    elif kind == "endpoint":
        what = {"base_url": c.base_url.rstrip("/"), "model_name": c.model_name}
    else:
        return "file-" + slug(c.own_label())
    sampled = asdict(s)
    if s.temperature == 0:
        del sampled["seed"]  # greedy answers do not depend on it (it also drives the bootstrap)
    blob = json.dumps({**what, **sampled, **(extra or {})}, sort_keys=True, ensure_ascii=False)
    return f"{slug(c.own_label())}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def prompt_hash(messages) -> str:
    return hashlib.sha1(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:12]


class AnswerStore:
    """One JSONL file of a candidate's outputs, keyed by item id and prompt hash; appended as they come.

    A torn last line (a run killed mid-write) is cut off, and that answer made again."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = {}
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                raw = raw[: raw.rfind(b"\n") + 1]
                with open(self.path, "r+b") as f:
                    f.truncate(len(raw))
            # "\n" only: splitlines() would also split at U+2028 and other separators an answer may hold
            for lineno, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{lineno}: not a stored answer ({e.msg}); move the file away to "
                                     f"answer again") from None
                self.rows[(row["id"], row["hash"])] = row

    def get(self, item_id: str, h: str) -> dict | None:
        return self.rows.get((item_id, h))

    def add(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.rows[(row["id"], row["hash"])] = row
            f.flush()
            os.fsync(f.fileno())


class LocalModel:
    """One of our models answering conversations in batches on the engine.

    One engine for all batches, its cache grown as a batch needs (the longest prompt and its answer,
    as a new engine's; a 7B model's full context in every slot would not fit a small card), each
    finished answer's keys kept in its row (Engine keep_prefixes): the next turn of a consultation
    prefills only the patient's new words, and a question only what follows the system prompt
    (get_answers); batches of at most batch_size conversations, each the next turn of the previous
    batch's, are what it serves best (consult.consult). keep_prefixes=False (set before a batch; the
    benchmark's "before"): a new engine per batch that keeps nothing."""

    def __init__(self, c: Candidate, s: GenerationSettings, device, dtype, batch_size: int = 16,
                 compile: bool = False, keep_prefixes: bool = True):
        if not Path(c.model, "config.json").is_file():
            raise UserError(f"--model {c.model}: no config.json there; pass a model directory (Hugging Face layout)")
        if c.adapter and not Path(c.adapter).is_dir():
            raise UserError(f"--adapter {c.adapter}: no such directory")
        self.name, self.s, self.batch_size, self.compile = c.label(), s, batch_size, compile
        self.seed_name = c.own_label()
        self.keep_prefixes, self.engine = keep_prefixes, None
        t0 = time.time()
        from .generate import load_for_inference  # torch loads only when one of our models answers
        # the adapter merged (base-model cost), then quantised; a trained adapter's own tokenizer and template win
        self.model, self.tok, self.template = load_for_inference(c.model, c.adapter, dtype, device, c.quant,
                                                                 template=c.template, what="evaluation")
        self.stop_ids = templates.stop_token_ids(self.tok, self.template)
        self.stops = templates.stop_strings(self.template)
        max_seq_len = self.model.config.max_seq_len
        self.budget = templates.prompt_budget(max_seq_len, max_seq_len, s.max_new_tokens)
        self.generated_tokens, self.truncated, self.seconds = 0, 0, 0.0
        self.prompt_tokens, self.cached_tokens = 0, 0  # cached: prompt tokens whose keys the engine kept
        print(f"{self.name}: loaded {c.model}{' + ' + c.adapter if c.adapter else ''} in {time.time() - t0:.1f}s",
              file=sys.stderr, flush=True)

    def _prompt(self, messages: list[dict]) -> list[int]:
        """Prompt ids; the oldest turns go first when the context is full (templates.fit_prompt), then
        the question's head: every item gets an answer, and the summary counts the cut ones."""
        try:
            return templates.fit_prompt(messages, self.tok, self.template, self.budget)
        except templates.PromptTooLong as e:
            self.truncated += 1
            return e.ids[-self.budget:]

    def respond(self, conversations: list[list[dict]], keys: list[str]) -> list[tuple[str | None, str]]:
        """(answer text, finish reason) per conversation; `keys` seed each sampled answer on its own."""
        from .engine import Engine, SamplingParams
        from .generate import cut_at_stop
        s, t0 = self.s, time.time()
        prompts = [self._prompt(self._with_system(m)) for m in conversations]
        # one seed per answer, from the candidate and the item: it does not depend on the rest of the batch
        seeds = [int(hashlib.sha1(f"{s.seed}:{self.seed_name}:{k}".encode()).hexdigest()[:8], 16) for k in keys]
        params = [SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                 top_k=s.top_k, stop_ids=tuple(self.stop_ids), stop_strings=tuple(self.stops),
                                 seed=seed) for seed in seeds]
        max_len = min(self.model.config.max_seq_len, max(map(len, prompts)) + s.max_new_tokens)
        engine = self.engine
        if engine is not None and engine.max_len < max_len:
            if engine.graphs:  # CUDA graphs are recorded on the cache: a new engine (its kept keys lost)
                engine = self.engine = None
            else:  # to what this batch needs, no more: a 7B model's cache at twice that might not fit a card
                engine.grow(max_len)
        if engine is None:
            # compiled, the step is compiled once per model, not per batch (engine_runner.compiled_decode)
            engine = Engine(self.model, tokenizer=self.tok, slots=self.batch_size, max_len=max_len,
                            compile=self.compile, keep_prefixes=self.keep_prefixes)
            self.engine = engine if self.keep_prefixes else None
        outputs = engine.generate(prompts, params)
        out = [(o.tokens, o.finish_reason) for o in outputs]
        self.generated_tokens += sum(len(t) for t, _ in out)
        self.prompt_tokens += sum(map(len, prompts))
        self.cached_tokens += sum(o.cached_tokens for o in outputs)
        self.seconds += time.time() - t0
        return [(cut_at_stop(self.tok.decode(t), self.stops).strip(), reason) for t, reason in out]

    def _with_system(self, messages):
        if self.s.system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.s.system}] + messages
        return messages

    def summary(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        text = f"{self.name}: {self.generated_tokens:,} tokens generated in {self.seconds:.1f}s ({rate:.0f} tok/s)"
        if self.cached_tokens:
            text += f", {self.cached_tokens:,} of {self.prompt_tokens:,} prompt tokens from kept keys"
        return text + (f", {self.truncated} prompts cut to fit the context" if self.truncated else "")

    def close(self):
        self.model = self.engine = None


class EndpointModel:
    """An OpenAI-compatible endpoint answering conversations (through llm.LLM, cached)."""

    def __init__(self, c: Candidate, s: GenerationSettings, cache_dir: Path, concurrency: int):
        self.name, self.s = c.label(), s
        name = f"answers-{c.label()}"  # with its side: the reply cache's key has no URL to tell two servers apart
        self.llm = from_flags(c, name=name, cache=role_cache(cache_dir, name, c.model_name), concurrency=concurrency)

    def respond(self, conversations, keys):
        s = self.s
        requests = [{"messages": ([{"role": "system", "content": s.system}] if s.system else []) + m,
                     "temperature": s.temperature, "top_p": s.top_p if s.top_p < 1 else None,
                     "max_tokens": s.max_new_tokens, "seed": s.seed} for m in conversations]
        out = []
        for a in self.llm.map(requests, desc=f"{self.name} answering"):
            reason = (a.finish_reasons or ["stop"])[0] if a.ok else "error"
            out.append((a.text.strip() if a.ok else None, reason))
        return out

    def summary(self) -> str:
        return self.llm.summary()

    def close(self):
        self.llm.close()


def answers_from_file(path: str, flag: str = "--answers") -> dict[str, str]:
    rows = read_records(path, "answer ({id, answer})", flag)
    out = {}
    for row in rows:
        if row.get("id") is None or not isinstance(row.get("answer"), str):
            raise UserError(f"{row['_where']}: an answer row needs 'id' and a string 'answer'")
        out[str(row["id"])] = row["answer"]
    return out


def open_candidate(c: Candidate, s: GenerationSettings, run) -> LocalModel | EndpointModel:
    """The candidate, ready to answer (our model keeps finished answers' keys: LocalModel)."""
    if c.kind() == "model":
        from .cli import resolve_device, resolve_dtype
        device = resolve_device(run.device)
        return LocalModel(c, s, device, resolve_dtype(run.dtype, device), run.batch_size, run.compile)
    return EndpointModel(c, s, Path(run.cache), run.concurrency)


def get_answers(c: Candidate, s: GenerationSettings, items: list[dict], run,
                summaries: list[str]) -> list[str | None]:
    """The candidate's answer to each item (item["messages"]), from its answer file or generated.

    None marks an endpoint that gave no usable answer (that pair is unjudged)."""
    if c.kind() == "answers":
        given = answers_from_file(c.answers)
        missing = [it["id"] for it in items if it["id"] not in given]
        if missing:
            raise UserError(f"--answers {c.answers}: no answer for ids {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}")
        return [given[it["id"]] for it in items]
    store = AnswerStore(Path(run.answers_dir) / f"{candidate_key(c, s)}.jsonl")
    hashes = [prompt_hash(it["messages"]) for it in items]
    todo = [i for i, (it, h) in enumerate(zip(items, hashes)) if store.get(it["id"], h) is None]
    print(f"{c.label()}: {len(items) - len(todo)}/{len(items)} answers in {store.path}, {len(todo)} to make",
          file=sys.stderr, flush=True)
    if todo:
        # our model keeps finished answers' keys: every prompt begins with the template's system prompt
        # (the model's default or --system), so a question admitted to a freed row prefills only what
        # follows it (96 KUAKE-QIC questions, Qwen2.5-Coder-0.5B-Instruct, 128 new tokens: prefill tokens
        # 3,874 -> 1,812, answering 1.07x as fast on a CPU, the same answers; docs/benchmarks.md)
        model = open_candidate(c, s, run)
        try:
            chunk = 64 if isinstance(model, LocalModel) else len(todo)  # a local run saves as it goes
            for b in range(0, len(todo), chunk):
                idx = todo[b:b + chunk]
                replies = model.respond([items[i]["messages"] for i in idx], [items[i]["id"] for i in idx])
                store.add([{"id": items[i]["id"], "hash": hashes[i], "answer": text, "finish_reason": reason}
                           for i, (text, reason) in zip(idx, replies) if text is not None])
                if isinstance(model, LocalModel):
                    print(f"{c.label()}: {min(b + chunk, len(todo))}/{len(todo)} answered", file=sys.stderr, flush=True)
            summaries.append(model.summary())
        finally:
            model.close()
    rows = [store.get(it["id"], h) for it, h in zip(items, hashes)]
    if items and not any(rows):  # every pair would go unjudged: said plainly, not only as a count in the tables
        print(f"warning: {c.label()} gave no usable answer to any of the {len(items)} items (its usage line says "
              f"why: e.g. a server refusing prompt + --max-new-tokens {s.max_new_tokens} beyond its context)",
              file=sys.stderr, flush=True)
    # a judge marks an answer without its end down: said, since the budget may be at fault, not the model
    reasons = [r.get("finish_reason") for r in rows if r]
    long, filtered = reasons.count("length"), reasons.count("content_filter")
    why = ([f"{long} at the length limit, --max-new-tokens {s.max_new_tokens}"] if long else []) + \
        ([f"{filtered} by a content filter"] if filtered else [])
    if why:
        summaries.append(f"{c.label()}: {long + filtered} of {len(reasons)} answers cut before their end "
                         f"({', '.join(why)})")
    return [r["answer"] if r else None for r in rows]
