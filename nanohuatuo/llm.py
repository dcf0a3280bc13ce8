"""The one client for every OpenAI-compatible call: the judge, distillation, evaluation, sampling.

    llm = LLM(base_url, model, api_key=None, cache="replies.sqlite", concurrency=4)
    a = llm.chat(messages, parse=None, temperature=0.0, max_tokens=512)    # one call -> Answer
    answers = llm.map([{"messages": [...], "temperature": 0.0}, ...], parse=fn, desc="judging")
    print(llm.summary())   # judge: 12 requests (4 cached), 3,456 prompt + 789 completion tokens, ...
    llm.close()

What it holds, and the policy for each kind of failure:
- Transport: the official `openai` client (`openai.OpenAI(base_url, api_key, max_retries,
  timeout)`). Its own retries with exponential backoff (and the server's Retry-After) handle
  connection errors, timeouts, 408, 409, 429 and 5xx; when those run out, `LLMError` stops the
  run (the server is gone: nothing would succeed) with what is cached kept for a rerun. A rate
  limit (429) is waited out longer: after the client's retries, the request is sent again after
  the server's Retry-After (or 5 s doubling to 60 s), for up to `rate_limit_wait` (10 min) in all.
- Refusals: 401/403 (the key) and 404 (the URL or the model name) raise `LLMError` at once; any
  other 4xx (400 context too long, 422, ...) makes that one item unusable, unretried, since
  resending the same request cannot help.
- Malformed answers: a 200 with empty `choices`, a body that is not JSON, a choice without
  content, a reasoning model's reply with nothing after its <think> block (the block itself is
  left out of every text: `visible`), or `parse(text)` raising ValueError(reason) are re-asked, up
  to `attempts` asks in all (the attempt number is part of the cache key, and `followup` may
  rewrite the messages for the next ask, e.g. to nudge the model towards the format). Then the
  Answer is unusable (ok False, error=reason) and counted in `usage.unusable[reason]`; a map never
  aborts for one item. Keep reasons short and generic ("no ranking line"): they are the summary's
  categories. A reply cut by max_tokens or a content filter (finish_reason "length",
  "content_filter") is unusable at once where a `parse` expects a whole reply (a verdict, a
  ranking, a distilled answer): its end is missing, and asking again the same way would be cut
  again. Text is kept as valid UTF-8 (a lone surrogate, half an emoji, becomes U+FFFD), so every
  reply can be cached.
- Cache: SQLite, keyed by the full request (model, messages, every parameter, attempt number).
  Every reply received with text, usable or not, and every refusal is written (and committed)
  before it is parsed, so an interrupted run resumes without repeating a request and a rerun of a
  finished one sends none. A reply without text (empty choices, a body that is not JSON: a
  server's outage answered with 200) is not kept, so a rerun asks again once the server is back.
  Parsing is redone on cached text, so a fixed parser re-reads old replies for free; an item whose
  cached asks all failed is unusable again on a rerun, unless `refresh_unusable=True` re-asks it
  (and only it). One cache file belongs to one endpoint: the base URL is not in the key, so a
  server restarted on another port keeps its cache.
- Concurrency: at most `concurrency` requests in flight (a thread pool in map(), a semaphore for
  chat() called from several threads). On an error or Ctrl-C, map() waits for the requests in
  flight so their replies reach the cache, then raises (a second Ctrl-C a second later drops
  them). Identical requests in one map() (the same messages and parameters, the same parse) are
  sent once and share the answer: two would be paid twice.
- Accounting: `usage` = Usage(requests, cached, prompt_tokens, completion_tokens, retried,
  unusable). `requests` counts every ask (cache hits included, `cached` of them from the cache);
  token counts are those the server reported for replies received in this run (cached replies
  cost nothing); `retried` counts re-sends, by the client after 429/5xx/timeouts and by us after
  a malformed reply. map() prints `desc: done/total, N cached, ETA` about every 5 s and at the end.

params (temperature, max_tokens, top_p, seed, stop, n, ...) go straight to
`client.chat.completions.create`; parameters set to None are left out. api_key None reads
$NANOHUATUO_API_KEY, then $OPENAI_API_KEY, else "EMPTY" (local servers ignore it, the client
insists on one).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cli import UserError

PROGRESS_EVERY_S = 5.0
CUT = {"length": "cut at max_tokens", "content_filter": "cut by a content filter"}  # finish_reason -> reason


class LLMError(UserError):
    """A failure no retry can fix (bad key, unknown model, server gone): the run stops, the cache stays."""


@dataclass
class Answer:
    """One ask's outcome. `text` is the last reply's first choice; `texts`/`finish_reasons` hold
    every choice (n > 1). `value` is parse(text), or text without a parser; None when unusable."""
    text: str | None = None
    value: object = None
    ok: bool = False
    cached: bool = False            # every reply came from the cache
    error: str | None = None        # why it is unusable
    prompt_tokens: int = 0
    completion_tokens: int = 0
    texts: list = field(default_factory=list)
    finish_reasons: list = field(default_factory=list)   # "stop", "length", ... per choice
    asks: int = 0                   # asks made (1 if the first reply was usable)


@dataclass
class Usage:
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retried: int = 0
    unusable: Counter = field(default_factory=Counter)


@dataclass
class Reply:
    """What one HTTP exchange gave: texts, or a reason it is malformed/rejected (then final=True
    means resending cannot help)."""
    texts: list | None = None
    finish_reasons: list | None = None
    error: str | None = None
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


def cache_key(model: str, messages: list, params: dict, attempt: int) -> str:
    """sha256 of everything that determines a reply."""
    blob = json.dumps({"model": model, "messages": messages, "params": params, "attempt": attempt},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def default_api_key() -> str:
    return os.environ.get("NANOHUATUO_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"


def valid_utf8(text: str) -> str:
    """The text with any lone surrogate (half of an emoji's UTF-16 pair, escaped in a JSON reply) as U+FFFD:
    such text cannot be written as UTF-8, so it could be neither cached nor saved."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def visible(text: str | None) -> str | None:
    """A reply as it is read: a reasoning model's thinking (a <think>...</think> block first, as DeepSeek-R1 and
    Qwen3 write it into the content; or only its end, where the chat template opened it) left out, so no parser
    reads a draft verdict or ranking in it and no answer carries it. A reply cut while thinking reads as ""."""
    if text is None or "think>" not in text:
        return text
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].lstrip()
    return "" if text.lstrip().startswith("<think>") else text


def retry_after(e) -> float | None:
    """The seconds an openai APIStatusError's response asks to wait (Retry-After-Ms or Retry-After), if any."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name)) / scale
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def server_message(e) -> str:
    """The server's own words from an openai APIStatusError (its error.message where it sent one)."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(getattr(e, "message", e))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextlib.contextmanager
def _one_interrupt():
    """Ctrl-C raises KeyboardInterrupt once; another within a second of it is the same interrupt (a double
    press; `timeout -s INT` signals the process and then its group), so the wait for the requests in flight
    that follows is not cut short by it; a later one is a new interrupt. Only where Ctrl-C is Python's
    default and this is the main thread (the only one that may set handlers)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    last = -math.inf

    def on_interrupt(signum, frame):
        nonlocal last
        if time.monotonic() - last <= 1.0:
            return
        last = time.monotonic()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LLM:
    """A cached, bounded, retrying chat-completions client for one endpoint and model (see module doc)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 cache: str | Path | None = None, concurrency: int = 4, max_retries: int = 4,
                 timeout: float = 120.0, attempts: int = 3, refresh_unusable: bool = False,
                 name: str = "llm", progress_every: float = PROGRESS_EVERY_S, rate_limit_wait: float = 600.0):
        import openai  # the offline paths of the stages run without the client installed

        if not base_url:
            raise UserError(f"{name}: no endpoint given; pass --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise UserError(f"{name}: no model name given; pass --model-name (GET {base_url}/models lists them)")
        if concurrency < 1 or attempts < 1:
            raise UserError(f"{name}: concurrency ({concurrency}) and attempts ({attempts}) must be at least 1")
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, name
        self.attempts, self.refresh_unusable = attempts, refresh_unusable
        self.concurrency, self.max_retries, self.progress_every = concurrency, max_retries, progress_every
        self.rate_limit_wait, self._said_429 = rate_limit_wait, -math.inf
        self._stopping = threading.Event()  # set while a map that stopped drains: a 429's wait ends at once
        self._openai = openai
        self._local = threading.local()  # HTTP sends of the current call, to count the client's retries
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._on_send]})
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or default_api_key(),
                                     max_retries=max_retries, timeout=timeout, http_client=http)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()  # guards usage and the SQLite connection
        self.usage = Usage()
        self._rejected = set()  # 4xx statuses already explained on stderr
        self.cache_path = Path(cache) if cache else None
        self._db = None
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # one connection shared by the worker threads, serialised by self._lock
                self._db = sqlite3.connect(self.cache_path, check_same_thread=False, timeout=30.0)
                self._db.execute("PRAGMA journal_mode=WAL")  # a second process may read while we write
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                    "texts TEXT, finish_reasons TEXT, error TEXT, final INTEGER NOT NULL, "
                    "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL)")
                self._db.commit()
            except sqlite3.DatabaseError as e:
                raise LLMError(f"{name}: cache {self.cache_path} is not a usable SQLite file ({e}); "
                                "move it away or pass another --cache") from None

    # -- lifecycle

    def close(self) -> None:
        with self._lock:  # a worker still finishing never meets a closed connection
            if self._db is not None:
                self._db.close()
                self._db = None
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- cache

    def _cache_get(self, key: str) -> Reply | None:
        with self._lock:
            row = None if self._db is None else self._db.execute(
                "SELECT texts, finish_reasons, error, final, prompt_tokens, completion_tokens "
                "FROM replies WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        texts, reasons, error, final, pt, ct = row
        return Reply(json.loads(texts) if texts is not None else None,
                     json.loads(reasons) if reasons is not None else None, error, bool(final), pt, ct)

    def _cache_put(self, key: str, request: dict, r: Reply) -> None:
        with self._lock:
            if self._db is None:
                return
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                key, json.dumps(request, ensure_ascii=False),
                None if r.texts is None else json.dumps(r.texts, ensure_ascii=False),
                None if r.finish_reasons is None else json.dumps(r.finish_reasons),
                r.error, int(r.final), r.prompt_tokens, r.completion_tokens, time.time()))
            self._db.commit()  # one commit per reply: an interrupted run keeps everything it paid for

    # -- one HTTP exchange

    def _on_send(self, request) -> None:
        self._local.sends = getattr(self._local, "sends", 0) + 1

    def _send(self, messages: list, params: dict) -> Reply:
        openai = self._openai
        where = f"{self.name}: {self.base_url}"
        resume = f"; replies so far are cached in {self.cache_path}, rerun to resume" if self._db else ""
        self._local.sends = 0
        try:
            with self._slots:
                response = self._create(messages, params)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise LLMError(f"{where} rejected the API key ({e.status_code}: {server_message(e)}); check --api-key or "
                           "$NANOHUATUO_API_KEY / $OPENAI_API_KEY") from None
        except openai.NotFoundError as e:
            raise LLMError(f"{where} answered 404 for model {self.model!r} ({server_message(e)}); check --base-url "
                           "(usually ends in /v1) and --model-name") from None
        except openai.APIStatusError as e:
            if e.status_code in (408, 409, 429) or e.status_code >= 500:
                waited = f" and {e.waited:.0f} s of waiting" if getattr(e, "waited", 0) else ""
                raise LLMError(f"{where} still answered {e.status_code} after {self.max_retries} retries{waited} "
                               f"({server_message(e)}){resume}; so far {self.summary()}") from None
            with self._lock:  # say why once per status; the count is in the summary
                first = e.status_code not in self._rejected
                self._rejected.add(e.status_code)
            if first:
                print(f"{where} rejected a request ({e.status_code}: {server_message(e)}); such items are unusable",
                      file=sys.stderr, flush=True)
            return Reply(error=f"rejected ({e.status_code})", final=True)  # resending cannot help
        except openai.APIConnectionError as e:  # includes timeouts
            raise LLMError(f"{where} could not be reached after {self.max_retries} retries ({e}){resume}; "
                           f"so far {self.summary()}") from None
        except openai.APIResponseValidationError:
            return Reply(error="invalid response")
        except ValueError:  # the body claimed JSON and was not
            return Reply(error="non-JSON body")
        finally:
            self._count(retried=max(0, self._local.sends - 1))
        if not hasattr(response, "choices"):  # the client hands back a non-JSON body as a str
            return Reply(error="non-JSON body")
        usage = getattr(response, "usage", None)
        tokens = dict(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                      completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        choices = response.choices or []
        if not choices:
            return Reply(error="empty choices", **tokens)
        texts = [getattr(getattr(c, "message", None), "content", None) for c in choices]
        if any(not isinstance(t, str) for t in texts):
            return Reply(error="no content", **tokens)
        texts = [valid_utf8(t) for t in texts]
        return Reply(texts=texts, finish_reasons=[getattr(c, "finish_reason", None) for c in choices], **tokens)

    def _create(self, messages: list, params: dict):
        """One chat completion through the client, waiting out rate limits: a 429 that outlasts the client's
        retries (a few seconds of backoff; it ignores a long Retry-After) is asked again after the server's
        Retry-After, or 5 s doubling to 60 s without one, for up to rate_limit_wait seconds in all. An exhausted
        quota (OpenAI's insufficient_quota) is not waited for, and a map that stops ends the wait at once."""
        waited, waits = 0.0, 0
        while True:
            try:
                return self._client.chat.completions.create(model=self.model, messages=messages, **params)
            except self._openai.RateLimitError as e:
                e.waited = waited  # for the message when this 429 is the last
                wait = retry_after(e) or min(60.0, 5.0 * 2 ** waits)
                quota = "quota" in f"{getattr(e, 'code', '')} {getattr(e, 'type', '')}"  # OpenAI's insufficient_quota
                if quota or waited + wait > self.rate_limit_wait:
                    raise
                now = time.monotonic()
                with self._lock:  # one line per half minute, not one per thread
                    say = now - self._said_429 >= 30
                    self._said_429 = now if say else self._said_429
                if say:
                    print(f"{self.name}: {self.base_url} is rate limiting (429: {server_message(e)}); waiting "
                          f"{wait:.0f} s before asking again", file=sys.stderr, flush=True)
                if self._stopping.wait(wait):  # the map stopped (an error, Ctrl-C): nobody waits for this reply
                    raise
                waited, waits = waited + wait, waits + 1

    def _count(self, unusable: str | None = None, **deltas) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.usage, name, getattr(self.usage, name) + delta)
            if unusable is not None:
                self.usage.unusable[unusable] += 1

    # -- one item: ask, cache, parse, re-ask

    def _asks(self, messages: list, params: dict, parse, followup, refresh: bool) -> Answer:
        answer, all_cached = Answer(), True
        for attempt in range(self.attempts):
            key = cache_key(self.model, messages, params, attempt)
            reply = None if refresh else self._cache_get(key)
            cached = reply is not None
            if reply is None:
                reply = self._send(messages, params)
                # stored before it is parsed: nothing received is lost if anything below fails; a reply
                # without text (an outage answered 200) is not kept, so a rerun asks again
                if reply.texts is not None or reply.final:
                    self._cache_put(key, {"model": self.model, "messages": messages, **params}, reply)
                self._count(requests=1, prompt_tokens=reply.prompt_tokens,
                            completion_tokens=reply.completion_tokens, retried=int(attempt > 0))
                answer.prompt_tokens += reply.prompt_tokens
                answer.completion_tokens += reply.completion_tokens
            else:
                self._count(requests=1, cached=1)
            all_cached = all_cached and cached
            answer.asks = attempt + 1
            answer.texts, answer.finish_reasons = [visible(t) for t in reply.texts or []], reply.finish_reasons or []
            answer.text, error = (answer.texts[0] if answer.texts else None), reply.error
            cut = CUT.get((reply.finish_reasons or [None])[0]) if parse is not None else None
            if error is None and cut:
                error = cut  # a verdict or a ranking may be what is missing: not used, not asked again
            elif error is None and parse is not None and not answer.text and (reply.texts or [""])[0]:
                error = "only thinking"  # visible() left nothing after the <think> block (without a parser: "", as cut)
            elif error is None:
                try:
                    answer.value = parse(answer.text) if parse is not None else answer.text
                except ValueError as e:
                    error = str(e) or "parse failed"
            answer.cached = all_cached
            if error is None:
                answer.ok, answer.error = True, None
                return answer
            answer.error, answer.value = error, None
            if reply.final or cut:
                break
            if answer.text is not None and followup is not None:
                messages = followup(messages, answer.text, error) or messages
        return answer

    def _ask(self, request: dict, parse, followup) -> Answer:
        request = dict(request)
        messages = request.pop("messages", None)
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{self.name}: a request needs a non-empty 'messages' list, got {messages!r}")
        if request.get("stream"):
            raise ValueError(f"{self.name}: stream is not supported here; drop it from the request")
        params = {k: v for k, v in request.items() if v is not None and k != "stream"}
        answer = self._asks(messages, params, parse, followup, refresh=False)
        if not answer.ok and answer.cached and self.refresh_unusable:
            # every ask of this item came from the cache and failed: ask again, from the first
            answer = self._asks(messages, params, parse, followup, refresh=True)
        if not answer.ok:
            self._count(unusable=answer.error)
        return answer

    def chat(self, messages: list, parse=None, followup=None, **params) -> Answer:
        """One item (see the module doc): an Answer, usable or not; LLMError when the endpoint refuses.

        followup(messages, reply_text, reason) -> messages for the next ask after an unusable
        reply (None: ask the same again)."""
        return self._ask({"messages": messages, **params}, parse, followup)

    def map(self, requests: list[dict], parse=None, followup=None, desc: str | None = None) -> list[Answer]:
        """Answers for [{"messages": [...], **params}, ...], in request order; progress lines on stderr.

        parse and followup are one function for all requests, or a list with one per request."""
        desc = desc or self.name
        total, done, from_cache = len(requests), 0, 0
        parses = list(parse) if isinstance(parse, (list, tuple)) else [parse] * total
        followups = list(followup) if isinstance(followup, (list, tuple)) else [followup] * total
        if len(parses) != total or len(followups) != total:
            raise ValueError(f"{self.name}: {total} requests but {len(parses)} parsers and {len(followups)} "
                             "followups; pass one function or one per request")
        answers: list[Answer | None] = [None] * total
        # identical requests (and the same parse and followup) are asked once: sent together, both would be paid
        first, same = {}, []
        for i, r in enumerate(requests):
            same.append(first.setdefault((json.dumps(r, sort_keys=True, ensure_ascii=False, default=str),
                                          id(parses[i]), id(followups[i])), i))
        unique = sorted(set(same))
        repeated, total = total - len(unique), len(unique)
        t0 = last = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency)
        futures = {}
        with _one_interrupt():
            try:
                for i in unique:
                    futures[pool.submit(self._ask, requests[i], parses[i], followups[i])] = i
                pending = set(futures)
                while pending:
                    finished, pending = concurrent.futures.wait(
                        pending, timeout=self.progress_every or None, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in finished:
                        answers[futures[future]] = a = future.result()  # an LLMError stops the map here
                        done += 1
                        from_cache += a.cached
                    now = time.monotonic()
                    if pending and now - last >= self.progress_every:
                        last = now
                        fresh = done - from_cache
                        eta = (now - t0) / fresh * (total - done) if fresh else float("nan")
                        print(f"{desc}: {done}/{total}, {from_cache} cached, ETA "
                              f"{_duration(eta) if fresh else '?'}", file=sys.stderr, flush=True)
            except BaseException as stop:
                # cancel what has not been sent, and wait for what is in flight: its replies are paid for
                in_flight = sum(f.running() for f in futures)
                if in_flight:
                    again = " (Ctrl-C again to drop them)" if isinstance(stop, KeyboardInterrupt) else ""
                    print(f"{desc}: waiting for the {in_flight} request{'s' * (in_flight > 1)} in flight, so their "
                          f"replies are cached{again}", file=sys.stderr, flush=True)
                self._stopping.set()
                try:
                    pool.shutdown(wait=True, cancel_futures=True)
                finally:
                    self._stopping.clear()
                raise
        pool.shutdown(wait=True)
        if total:
            once = f" ({repeated} repeated requests asked once)" if repeated else ""
            print(f"{desc}: {done}/{total}, {from_cache} cached, {_duration(time.monotonic() - t0)}{once}",
                  file=sys.stderr, flush=True)
        return [answers[same[i]] if i == same[i] else replace(answers[same[i]]) for i in range(len(requests))]

    def summary(self) -> str:
        """judge: 12 requests (4 cached), 3,456 prompt + 789 completion tokens, 1 unusable (no ranking line)"""
        u = self.usage
        text = (f"{self.name}: {u.requests:,} requests ({u.cached:,} cached), {u.prompt_tokens:,} prompt + "
                f"{u.completion_tokens:,} completion tokens")
        if u.retried:
            text += f", {u.retried:,} retried"
        n_bad = sum(u.unusable.values())
        if n_bad:
            why = ", ".join(f"{n} {reason}" if n != n_bad else reason for reason, n in u.unusable.most_common())
            text += f", {n_bad:,} unusable ({why})"
        return text


def from_flags(cfg, role: str = "", cache: str | Path | None = None, name: str | None = None,
               base_url: str | None = None, model_name: str | None = None, api_key: str | None = None,
               **kw) -> LLM:
    """The LLM of one role from its endpoint flags (cli.endpoint_flags): --ROLE-base-url, --ROLE-model-name,
    --ROLE-api-key, and --concurrency, --attempts, --timeout, --refresh-unusable where the config has them.

    The one way a command builds a client; base_url, model_name and api_key given here win over the flags
    (a role falling back to another's endpoint). A missing endpoint or model name is one line naming the flags."""
    pre, dash = (f"{role}_", f"--{role}-") if role else ("", "--")
    base_url = base_url or getattr(cfg, pre + "base_url")
    model_name = model_name or getattr(cfg, pre + "model_name")
    api_key = api_key if api_key is not None else getattr(cfg, pre + "api_key")
    name = name or role or "llm"
    if not (base_url and model_name):
        raise UserError(f"{name}: needs {dash}base-url URL and {dash}model-name NAME (an OpenAI-compatible endpoint)")
    for key in ("concurrency", "attempts", "timeout", "refresh_unusable"):
        if hasattr(cfg, key):
            kw.setdefault(key, getattr(cfg, key))
    return LLM(base_url, model_name, api_key=api_key, cache=cache, name=name, **kw)


def cache_file(flag: str | None, default: str | Path) -> str | Path | None:
    """The reply cache a command's --cache names: the flag's file, `default` when it is empty, None for 'none'."""
    if (flag or "").lower() == "none":
        return None
    return flag or default


def slug(text: str) -> str:
    """A file-name-safe short form of a name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "x"


def role_cache(cache_dir: str | Path, name: str, model_name: str) -> Path:
    """One SQLite cache per role and model under a directory of caches (one cache belongs to one endpoint)."""
    return Path(cache_dir) / f"{slug(name)}-{slug(model_name)}.sqlite"
