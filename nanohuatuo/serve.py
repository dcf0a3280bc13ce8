"""An OpenAI-compatible HTTP server for one model, on the continuous-batching engine, and a chat page.

    python serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (raw prompts), GET /health
(no key needed) and GET / (the chat page in nanohuatuo/static/). The wire format follows OpenAI's
closely enough that the official `openai` client, our judge, evaluate.py and distill.py use it
unchanged: streaming as server-sent events (a role delta, content deltas, the finish_reason, then
`data: [DONE]`), usage in every answer, `n`, `stop`, `seed`, logprobs. Chat prompts are rendered
with the model's own chat template; answers are what the model wrote (no disclaimer added).

How a request flows: a handler thread (one per connection) checks the request and renders the
prompt; `EngineLoop.submit` (nanohuatuo/engine_loop.py) adds it to the engine; one engine thread calls
`engine.step()` in a loop, turns each new token into text (a StreamDecoder, so no half characters;
text that may be the start of a stop string is held back) and puts the pieces on the request's
queue; the handler writes them to the client. A client that goes away is noticed between tokens and its rows are cancelled, so the
slot is free at the next step. When slots plus --max-queue sequences are in flight, new requests are
answered 429 with Retry-After instead of piling up.

The HTTP layer is the standard library's ThreadingHTTPServer: the server needs little of a
framework (JSON in, JSON or an event stream out, a thread per client that blocks on a queue), and
the engine already runs its own thread, so threads read more plainly than an asyncio bridge. It is
meant for a trusted network (loopback by default, an optional API key); put a reverse proxy in
front of it, or use vLLM, to face the internet.
"""

import hmac
import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

from .cli import ModelFlags, UserError, arg, cli_main, resolve_device, resolve_dtype
from .engine import Engine, SamplingParams
from .engine_loop import EngineLoop, GenerationFailed, QueueFull
from .generate import load_for_inference
from .httpjson import APIError, ClientGone, JSONHandler, type_name
from .templates import generation_defaults, render_prompt, stop_strings, stop_token_ids

STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 * 2**20  # bytes of request JSON accepted
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; a few more cost nothing)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (5 for completions)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ServeConfig(ModelFlags):
    adapter: str | None = arg(None, "LoRA adapter directory (PEFT layout), merged at load")
    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0 for every interface: set --api-key then)")
    port: int = arg(8000, "port to listen on (0: any free port, printed at start)")
    served_model_name: str | None = arg(None, "the model name the server advertises and clients ask for (default: "
                                              "the model directory's name)", old=("--model-name",))
    int8: bool = arg(False, "int8 weight-only quantisation (a 7B model in about 7.5 GB)")
    compile: bool = arg(False, "torch.compile the decode step (CUDA graphs; slow first requests)")
    batch_size: int = arg(16, "sequences decoded together (engine slots; also the largest n)", old=("--slots",))
    max_len: int = arg(4096, "context window per sequence, prompt plus answer, in tokens (at most the model's); "
                             "the KV cache holds batch-size x max-len tokens")
    max_queue: int = arg(64, "sequences allowed to wait for a slot; beyond that requests get 429")
    api_key: str | None = arg(None, "require 'Authorization: Bearer KEY' on every route but /health "
                                    "(default: env NANOHUATUO_API_KEY, else no key)")
    log_requests: bool = arg(True, "print one line per request on stderr")


# ----------------------------------------------------------------------------- requests

@dataclass
class Job:
    """A checked request: what to generate and how to answer."""
    kind: str  # "chat" or "completion"
    prompts: list  # token ids per prompt (chat: one)
    params: SamplingParams
    n: int
    stops: list  # stop strings cut from the text
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: list | None = None  # completions with echo: the prompt text per prompt


def _get(body, name, kinds, default=None, lo=None, hi=None):
    """body[name] checked against the JSON kinds ("integer", "number", "boolean", "string") and [lo, hi]."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"integer": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "boolean": isinstance(v, bool), "string": isinstance(v, str)}
    if not any(ok[k] for k in kinds):
        raise APIError(400, f"'{name}' must be {' or '.join(kinds)}, got {type_name(v)} {json.dumps(v)[:40]}",
                       param=name, code="invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{name}' is {v}; it must be {bound}", param=name, code="invalid_value")
    return v


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' has {len(stop)} strings; at most {MAX_STOP}", param="stop",
                       code="invalid_value")
    return [s for s in stop if s]


def _content(message, i):
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text can be served by a text model
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or an array of text parts, got "
                        f"{type_name(content)}", param=f"messages[{i}].content", code="invalid_type")


def chat_messages(body):
    """The request's messages as [{"role", "content"}] with OpenAI's role names mapped to the template's."""
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required: a list of {role, content} objects", param="messages",
                       code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content', got {type_name(m)}",
                           param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            what = "is not supported by this server (no tools)" if role in ("tool", "function") else "is unknown"
            raise APIError(400, f"messages[{i}].role {json.dumps(role)} {what}; use system, user or assistant",
                           param=f"messages[{i}].role", code="invalid_value")
        out.append({"role": ROLES[role], "content": _content(m, i)})
    return out


# ----------------------------------------------------------------------------- the service

class Service:
    """Everything a request handler needs: the model's tokenizer and template, limits, the runner."""

    def __init__(self, cfg: ServeConfig, model, tok, template, engine=None):
        self.cfg = cfg
        self.tok, self.template = tok, template
        # what a request leaves out: the model's generation_config.json, else OpenAI's defaults
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                         **generation_defaults(cfg.model, cfg.adapter or None)}
        self.name = cfg.served_model_name or Path(cfg.model).resolve().name
        self.context = min(cfg.max_len, model.config.max_seq_len) if cfg.max_len > 0 else model.config.max_seq_len
        self.api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("NANOHUATUO_API_KEY") or None
        self.chat_stop_ids = tuple(sorted(stop_token_ids(tok, template)))
        self.raw_stop_ids = tuple(sorted(tok.stop_ids))
        self.template_stops = stop_strings(template)
        self.created = int(time.time())
        engine = engine or Engine(model, tokenizer=tok, slots=cfg.batch_size, max_len=self.context,
                                  compile=cfg.compile)
        self.runner = EngineLoop(engine, tok, capacity=cfg.batch_size + cfg.max_queue)

    # --- checking requests

    def check_model(self, body):
        model = body.get("model")
        if model is None:
            raise APIError(400, f"'model' is required; this server serves {self.name!r}", param="model",
                           code="missing_required_parameter")
        if not isinstance(model, str):
            raise APIError(400, f"'model' must be a string, got {type_name(model)}", param="model",
                           code="invalid_type")
        if model != self.name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def sampling(self, body, prompt_len, chat):
        """SamplingParams from the request fields, checked against the context window."""
        limit = self.context - prompt_len
        if limit < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, but the prompt is "
                                f"{prompt_len} tokens; shorten the messages", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _get(body, name, ["integer"], default=None)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"'{name}' is {max_tokens}; it must be at least 1", param=name, code="invalid_value")
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; you asked for "
                                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} in the "
                                f"answer); lower '{name}' to at most {limit}", param=name,
                           code="context_length_exceeded")
        seed = _get(body, "seed", ["integer"])
        ignore_eos = _get(body, "ignore_eos", ["boolean"], default=False)  # vLLM's extension, for benchmarks
        d = self.defaults
        return SamplingParams(
            max_new_tokens=max_tokens or limit,
            temperature=float(_get(body, "temperature", ["number"], d["temperature"], 0, 2)),
            top_p=float(_get(body, "top_p", ["number"], d["top_p"], 0, 1)),
            top_k=max(0, _get(body, "top_k", ["integer"], d["top_k"], -1, None)),  # vLLM's extension; -1: off
            repetition_penalty=float(_get(body, "repetition_penalty", ["number"], d["repetition_penalty"], 0.01, 10)),
            stop_ids=() if ignore_eos else (self.chat_stop_ids if chat else self.raw_stop_ids),
            seed=None if seed is None else seed % 2**63,
        )

    def common(self, body, job_kwargs):
        n = _get(body, "n", ["integer"], 1)
        if not 1 <= n <= self.cfg.batch_size:
            raise APIError(400, f"'n' is {n}; it must be between 1 and {self.cfg.batch_size} (the server's "
                                f"--batch-size)", param="n", code="invalid_value")
        stream = _get(body, "stream", ["boolean"], False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        include_usage = _get(options, "include_usage", ["boolean"], False)
        return Job(n=n, stream=stream, include_usage=bool(stream and include_usage), **job_kwargs)

    def chat_job(self, body) -> Job:
        self.check_model(body)
        messages = chat_messages(body)
        try:
            prompt = render_prompt(messages, self.tok, self.template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        params = self.sampling(body, len(prompt), chat=True)
        logprobs = _get(body, "logprobs", ["boolean"], False)
        top = _get(body, "top_logprobs", ["integer"], 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        params.logprobs, params.top_logprobs = logprobs, top
        return self.common(body, dict(kind="chat", prompts=[prompt], params=params,
                                      stops=_stops(body) + self.template_stops, logprobs=logprobs,
                                      top_logprobs=top))

    def completion_job(self, body) -> Job:
        self.check_model(body)
        prompts = self.raw_prompts(body.get("prompt"))
        params = self.sampling(body, max(len(p) for p in prompts), chat=False)
        top = _get(body, "logprobs", ["integer"], None, 0, 5)
        params.logprobs, params.top_logprobs = top is not None, top or 0
        echo = _get(body, "echo", ["boolean"], False)
        return self.common(body, dict(kind="completion", prompts=prompts, params=params, stops=_stops(body),
                                      logprobs=top is not None, top_logprobs=top or 0,
                                      echo=[self.tok.decode(p) for p in prompts] if echo else None))

    def raw_prompts(self, prompt):
        """Token ids per prompt: a string, an array of strings, an array of ids or of id arrays."""
        if prompt is None:
            raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "'prompt' must be a string, an array of strings or of token ids", param="prompt",
                           code="invalid_type")
        if len(prompt) > self.cfg.batch_size:
            raise APIError(400, f"'prompt' holds {len(prompt)} prompts; at most {self.cfg.batch_size}", param="prompt",
                           code="invalid_value")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tok.encode(p, bos=self.tok.add_bos)
            elif isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
                if any(not 0 <= i < self.tok.vocab_size for i in p):
                    raise APIError(400, f"'prompt': token ids must be in [0, {self.tok.vocab_size})", param="prompt",
                                   code="invalid_value")
                ids = list(p)
            else:
                raise APIError(400, "'prompt' must be a string, an array of strings or of token ids",
                               param="prompt", code="invalid_type")
            if not ids:
                raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
            out.append(ids)
        return out

    # --- the answer's pieces

    def token_text(self, token):
        """(text, bytes) of one token as logprobs show it; a byte-fallback piece (part of a character)
        is written as OpenAI does, "\\xe5", with its byte."""
        piece = self.tok.id_to_token(token) or ""
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            return "\\x" + m.group(1).lower(), [int(m.group(1), 16)]
        text = self.tok.decode([token], skip_special=False, continuation=True, replacement=True)
        return text, list(text.encode("utf-8"))

    def chat_logprobs(self, lps):
        content = []
        for token, logprob, top, _ in lps:
            text, raw = self.token_text(token)
            tops = []
            for t, lp in (top or [])[:MAX_TOP_LOGPROBS]:
                t_text, t_raw = self.token_text(t)
                tops.append({"token": t_text, "logprob": lp, "bytes": t_raw})
            content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": tops})
        return {"content": content, "refusal": None}

    def completion_logprobs(self, lps, echo_len):
        tokens, token_lps, tops, offsets = [], [], [], []
        for token, logprob, top, offset in lps:
            tokens.append(self.token_text(token)[0])
            token_lps.append(logprob)
            tops.append({self.token_text(t)[0]: lp for t, lp in top} if top is not None else None)
            offsets.append(echo_len + offset)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def usage(self, ticket):
        completion = sum(c.tokens for c in ticket.choices)
        return {"prompt_tokens": ticket.prompt_tokens, "completion_tokens": completion,
                "total_tokens": ticket.prompt_tokens + completion}


# ----------------------------------------------------------------------------- HTTP

class Handler(JSONHandler):
    server_version = "nanohuatuo"
    timeout = 600  # seconds an idle kept-alive connection holds its thread

    @property
    def svc(self) -> Service:
        return self.server.service

    def log_line(self, status, extra=""):
        if self.svc.cfg.log_requests:
            print(f'{self.client_address[0]} "{self.command} {self.path}" {status}{extra}', file=sys.stderr,
                  flush=True)

    def send_error_body(self, err: APIError):
        self.send_json(err.status, err.body(), err.headers)
        self.log_line(err.status, f" {err.message[:120]}")

    def authorized(self):
        key = self.svc.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), key.encode())

    def route(self, routes):
        self.streaming = False
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if self.command == "POST":
                raw = self.read_body(MAX_BODY)  # read first, so a refused request leaves the connection clean
            # the page is public (a browser cannot send a key to load it; it asks for one); /health too
            if path not in ("/", "/health", "/index.html") and not self.authorized():
                raise APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            handler = routes.get(path)
            if handler is None:
                if path.startswith("/v1/models/") and self.command == "GET":
                    handler = self.model_info
                else:
                    raise APIError(404, f"no route {self.command} {path}", code="not_found")
            if self.command == "POST":
                handler(self.json_body(raw))
            else:
                handler()
        except APIError as e:
            self.send_error_body(e)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.log_line("-", " the client went away; its rows were cancelled")
        except Exception as e:  # a bug answers 500 and the server goes on
            import traceback
            traceback.print_exc()
            self.close_connection = True
            if not self.streaming:  # once an event stream began, only closing it can tell the client
                try:
                    self.send_error_body(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                  type="server_error"))
                except OSError:
                    pass

    def do_GET(self):
        self.route({"/": self.page, "/index.html": self.page, "/health": self.health, "/v1/models": self.models})

    def do_POST(self):
        self.route({"/v1/chat/completions": self.chat, "/v1/completions": self.completions})

    # --- routes

    def page(self):
        self.send_bytes(200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8",
                        {"Cache-Control": "no-cache"})

    def health(self):
        r = self.svc.runner
        self.send_json(200, {"status": "ok", "model": self.svc.name, "in_flight": r.in_flight,
                             "capacity": r.capacity, "cancelled": r.cancelled})

    def model_card(self):
        return {"id": self.svc.name, "object": "model", "created": self.svc.created, "owned_by": "nanohuatuo",
                "max_model_len": self.svc.context}

    def models(self):
        self.send_json(200, {"object": "list", "data": [self.model_card()]})

    def model_info(self):
        name = self.path.split("?", 1)[0][len("/v1/models/"):]
        if name != self.svc.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.svc.name!r}",
                           param="model", code="model_not_found")
        self.send_json(200, self.model_card())

    def chat(self, body):
        self.answer(self.svc.chat_job(body), "chatcmpl")

    def completions(self, body):
        self.answer(self.svc.completion_job(body), "cmpl")

    # --- answering

    def answer(self, job, prefix):
        svc = self.svc
        want, capacity = len(job.prompts) * job.n, svc.runner.capacity
        if want > capacity:  # would never fit: not a reason to retry
            raise APIError(400, f"the request needs {want} sequences (prompts x n); this server holds at most "
                                f"{capacity} (--batch-size plus --max-queue)", param="n", code="invalid_value")
        try:
            ticket = svc.runner.submit(job.prompts, job.params, job.n, job.stops, strip_end=job.kind == "chat")
        except QueueFull:
            raise APIError(429, f"the server is busy ({capacity} sequences in flight or waiting); "
                                f"retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:  # the engine refused a prompt
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": svc.name,
                "system_fingerprint": "nanohuatuo"}
        try:
            if job.stream:
                self.stream_answer(job, ticket, head)
            else:
                self.whole_answer(job, ticket, head)
        finally:
            svc.runner.cancel(ticket)  # a no-op once every choice finished; frees the rows of a client gone
        u = svc.usage(ticket)
        self.log_line(200, f" {u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                           f"{time.perf_counter() - ticket.t0:.2f} s")

    def messages(self, ticket):
        """(index, text, logprobs, finish_reason) from the engine thread, until every choice finished;
        the client is checked whenever nothing came for a moment."""
        try:
            yield from ticket.pieces(idle=self.check_client)
        except GenerationFailed as e:
            raise APIError(500, str(e), type="server_error") from None

    def whole_answer(self, job, ticket, head):
        svc = self.svc
        texts = [""] * len(ticket.choices)
        lps = [[] for _ in ticket.choices]
        for index, text, logprobs, _ in self.messages(ticket):
            texts[index] += text
            lps[index] += logprobs
        choices = []
        for c in ticket.choices:
            if job.kind == "chat":
                choices.append({"index": c.index, "message": {"role": "assistant", "content": texts[c.index],
                                                              "refusal": None},
                                "logprobs": svc.chat_logprobs(lps[c.index]) if job.logprobs else None,
                                "finish_reason": c.finish_reason})
            else:
                echo = job.echo[c.index // job.n] if job.echo else ""
                choices.append({"index": c.index, "text": echo + texts[c.index],
                                "logprobs": svc.completion_logprobs(lps[c.index], len(echo)) if job.logprobs else None,
                                "finish_reason": c.finish_reason})
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        self.send_json(200, {**head, "object": obj, "choices": choices, "usage": svc.usage(ticket)})

    def stream_answer(self, job, ticket, head):
        svc = self.svc
        chat = job.kind == "chat"
        self.streaming = True
        self.begin_event_stream()
        base = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if job.include_usage:
            base["usage"] = None  # OpenAI sends usage null in every chunk but the last
        echo_len = [len(job.echo[c.index // job.n]) if job.echo else 0 for c in ticket.choices]
        unfinished = len(ticket.choices)

        def chunk(index, text, lps, reason, role=False, usage=None):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta,
                          "logprobs": svc.chat_logprobs(lps) if job.logprobs and lps else None,
                          "finish_reason": reason}
            else:
                choice = {"index": index, "text": text,
                          "logprobs": svc.completion_logprobs(lps, echo_len[index]) if job.logprobs and lps else None,
                          "finish_reason": reason}
            self.event({**base, "choices": [choice], **({"usage": usage} if usage else {})})

        for c in ticket.choices:
            if chat:
                chunk(c.index, "", [], None, role=True)
            elif job.echo:
                chunk(c.index, job.echo[c.index // job.n], [], None)
        try:
            for index, text, lps, reason in self.messages(ticket):
                if text or lps:
                    chunk(index, text, lps, None)
                if reason is not None:
                    unfinished -= 1
                    # usage in every answer: on the last chunk, unless asked for as a chunk of its own
                    last = not unfinished and not job.include_usage
                    chunk(index, "", [], reason, usage=svc.usage(ticket) if last else None)
        except APIError as e:  # the engine failed after the answer began: say so in the stream
            self.event(e.body())
        if job.include_usage:
            self.event({**base, "choices": [], "usage": svc.usage(ticket)})
        self.end_event_stream()


class Server(ThreadingHTTPServer):
    """The HTTP server with its Service; start() serves from a background thread, close() stops all."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service: Service, host="127.0.0.1", port=8000):
        self.service = service
        super().__init__((host, port), Handler)
        self.host, self.port = self.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = None

    def start(self):
        self.service.runner.start()
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def close(self):
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=30)
        self.server_close()
        self.service.runner.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_server(cfg: ServeConfig, model=None, tok=None, template=None, engine=None) -> Server:
    """A Server for cfg (the model loaded from cfg.model unless given), bound but not started."""
    if cfg.batch_size < 1 or cfg.max_queue < 0 or cfg.max_len < 0:
        raise UserError(f"--batch-size {cfg.batch_size}, --max-queue {cfg.max_queue}, --max-len {cfg.max_len}: need "
                        f"batch-size >= 1, max-queue >= 0 and max-len >= 0")
    if model is None:
        if not cfg.model:
            raise UserError("--model is required: a model directory in the Hugging Face layout")
        if not Path(cfg.model).is_dir():
            raise UserError(f"--model {cfg.model}: no such directory")
        if cfg.adapter and not Path(cfg.adapter).is_dir():
            raise UserError(f"--adapter {cfg.adapter}: no such directory")
        device = resolve_device(cfg.device)
        # everything cheap is checked before the weights are read; a broken template fails here
        # (resolve_template renders a probe), not per request
        model, tok, template = load_for_inference(cfg.model, cfg.adapter, resolve_dtype(cfg.dtype, device), device,
                                                  cfg.int8, cfg.template, what="serving")
    try:
        return Server(Service(cfg, model, tok, template, engine), cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; pick another --port") from None


def run(cfg: ServeConfig) -> int:
    server = make_server(cfg)
    svc = server.service
    if svc.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {cfg.host} without an API key; anyone who can reach it can use the model",
              file=sys.stderr)
    try:
        svc.runner.start()
        print(f"serving {svc.name} (template {svc.template}, context {svc.context}, {cfg.batch_size} slots) on "
              f"{server.url}: chat page at {server.url}/, API at {server.url}/v1", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        svc.runner.stop()
    return 0


USAGE = """Serve a model as an OpenAI-compatible endpoint, with a chat page at /.

    python serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "头痛怎么办？"}])

NAME is the model directory's name (or --model-name); GET /v1/models lists it. Routes:
/v1/chat/completions, /v1/completions, /v1/models, /health (no key needed) and / (the chat page).
Models are not medical advice: everything they say must be checked by a doctor."""


def main(argv=None) -> int:
    return cli_main(run, ServeConfig, argv, prog="serve.py", description=USAGE)


if __name__ == "__main__":
    sys.exit(main())
