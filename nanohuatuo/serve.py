"""An OpenAI-compatible HTTP server for one model and its LoRA adapters, on the continuous-batching engine.

    python serve.py --model DIR [--adapter DIR] [--lora NAME=DIR ...] [--host 127.0.0.1] [--port 8000]

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (raw prompts), GET /health
(no key needed), GET / (the chat page in nanohuatuo/static/) and OPTIONS on any of them (a
browser's CORS preflight). The wire format follows OpenAI's closely enough that the official
`openai` client, our judge, evaluate.py, distill.py and lm-evaluation-harness's local-completions
use it unchanged: streaming as server-sent events (a role delta, content deltas, the finish_reason,
then `data: [DONE]`), usage in every answer (`prompt_tokens_details.cached_tokens`: the prompt tokens
whose keys the engine kept from an earlier answer, a conversation's previous turn), `n`, `stop`,
`seed`, logprobs, prompt log-probs with `echo`. What a request may ask and how an answer is shaped
is nanohuatuo/openai_api.py (fields the server would not honour are refused there with a 400
naming them); this module is the HTTP side.
Chat prompts are rendered with the model's own chat template; answers are what the model wrote.

LoRA adapters: `--adapter DIR` is merged into the weights (the base's name then serves it);
`--lora NAME=DIR ...` serves each adapter under its own name next to the base, and a request's
`model` picks one, as vLLM's --lora-modules. They run unmerged on the one base and one KV cache,
each batch row through its own adapter (nanohuatuo/multi_lora.py: two small extra products per
adapted layer and step, nothing while every row runs the base); the base's tokenizer, chat
template and generation defaults serve them all.

How a request flows: a handler thread (one per connection) checks the request and renders the
prompt; `EngineLoop.submit` (nanohuatuo/engine_loop.py) adds it to the engine; one engine thread calls
`engine.step()` in a loop, turns each new token into text (a StreamDecoder, so no half characters;
text that may be the start of a stop string is held back) and puts the pieces on the request's
queue; the handler writes them to the client. A client that goes away is noticed between tokens
and its rows are cancelled, so the slot is free at the next step. When slots plus --max-queue
sequences are in flight, new requests are answered 429 with Retry-After instead of piling up.

The HTTP layer is the standard library's ThreadingHTTPServer: the server needs little of a
framework (JSON in, JSON or an event stream out, a thread per client that blocks on a queue), and
the engine already runs its own thread, so threads read more plainly than an asyncio bridge. It is
meant for a trusted network (loopback by default, an optional API key); put a reverse proxy in
front of it, or use vLLM, to face the internet. CORS: every answer carries
Access-Control-Allow-Origin: * by default, as vLLM's, so a page on another origin can call it
(with the API key if one is set); --cors-origin names the origins allowed, or none.
"""

import hmac
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

from .cli import ModelFlags, UserError, arg, cli_main, resolve_device, resolve_dtype
from .engine import Engine
from .engine_loop import EngineLoop, GenerationFailed, QueueFull
from .generate import inference_quant, load_for_inference
from .httpjson import APIError, ClientGone, JSONHandler
from .multi_lora import attach_adapters
from .openai_api import OpenAIProtocol, joined_logprobs
from .quant import INFERENCE_QUANT_HELP, INFERENCE_QUANTS
from .templates import generation_defaults, stop_strings, stop_token_ids

STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 * 2**20  # bytes of request JSON accepted


@dataclass
class ServeConfig(ModelFlags):
    adapter: str | None = arg(None, "LoRA adapter directory (PEFT layout), merged at load")
    lora: list[str] = arg([], "LoRA adapters served by name next to the base, unmerged: NAME=DIR ... (a "
                              "request's 'model' picks one)", metavar="NAME=DIR")
    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0 for every interface: set --api-key then)")
    port: int = arg(8000, "port to listen on (0: any free port, printed at start)", bounds="[0, 65535]")
    served_model_name: str | None = arg(None, "the model name the server advertises and clients ask for (default: "
                                              "the --adapter directory's name, else the model directory's)",
                                        old=("--model-name",))
    quant: str = arg("none", INFERENCE_QUANT_HELP, choices=list(INFERENCE_QUANTS))
    int8: bool = arg(False, "int8 weight-only quantisation", retired="--quant int8")  # earlier spelling, hidden
    compile: bool = arg(False, "torch.compile the decode step (CUDA graphs on CUDA; fused element-wise ops on "
                               "CPU; slow first requests)")
    batch_size: int = arg(16, "sequences decoded together (engine slots; also the largest n)", old=("--slots",),
                          bounds="[1, inf)")
    max_len: int = arg(4096, "context window per sequence, prompt plus answer, in tokens (at most the model's); "
                             "the KV cache holds batch-size x max-len tokens", bounds="[0, inf)")
    max_queue: int = arg(64, "sequences allowed to wait for a slot; beyond that requests get 429", bounds="[0, inf)")
    api_key: str | None = arg(None, "require 'Authorization: Bearer KEY' on every route but /health "
                                    "(default: env NANOHUATUO_API_KEY, else no key)")
    cors_origin: str = arg("*", "origins a browser page may call the API from (Access-Control-Allow-Origin): "
                                "* for any, as vLLM; a comma-separated list; none for no CORS headers")
    log_requests: bool = arg(True, "print one line per request on stderr")


# ----------------------------------------------------------------------------- loading

def load_model(cfg: ServeConfig):
    """(model, tokenizer, template) ready for inference, as the flags ask.

    Everything cheap is checked before the weights are read (the directory, every tensor's name
    and shape, the adapter's config, the tokenizer, the chat template), so a mistake costs seconds.
    """
    if not cfg.model:
        raise UserError("--model is required: a model directory in the Hugging Face layout")
    if not Path(cfg.model).is_dir():
        raise UserError(f"--model {cfg.model}: no such directory")
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise UserError(f"--adapter {cfg.adapter}: no such directory")
    loras = lora_flags(cfg)
    device = resolve_device(cfg.device)
    # a broken template fails here (resolve_template renders a probe), not per request
    model, tok, template = load_for_inference(cfg.model, cfg.adapter, resolve_dtype(cfg.dtype, device), device,
                                              inference_quant(cfg.quant, cfg.int8), cfg.template, what="serving")
    if loras:
        attach_adapters(model, loras)
    return model, tok, template


def lora_flags(cfg: ServeConfig) -> dict[str, str]:
    """{name: directory} from --lora NAME=DIR ..., checked: names unique and not the base's."""
    loras = {}
    for item in cfg.lora:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UserError(f"--lora {item}: expected NAME=DIR (the name clients ask for, the adapter's directory)")
        if name in loras or name == served_name(cfg):
            raise UserError(f"--lora {item}: the name {name!r} is taken (each adapter needs its own, not the base's)")
        if not Path(path).is_dir():
            raise UserError(f"--lora {item}: no such directory {path}")
        loras[name] = path
    if loras and cfg.compile:
        raise UserError("--compile cannot be used with --lora: the per-row adapter choice changes every step, "
                        "which CUDA graphs would freeze")
    return loras


def served_name(cfg: ServeConfig) -> str:
    """--served-model-name, else the merged adapter's directory name, else the model's: two servers of one
    base with different adapters merged must not answer to one name (a client's reply cache keys on it)."""
    return cfg.served_model_name or Path(cfg.adapter or cfg.model).resolve().name


# ----------------------------------------------------------------------------- the service

class Service:
    """Everything a request handler needs: the model's tokenizer and template, limits, the runner."""

    def __init__(self, cfg: ServeConfig, model, tok, template, engine=None):
        self.cfg = cfg
        self.tok, self.template = tok, template
        # what a request leaves out: the model's generation_config.json, else OpenAI's defaults
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                    **generation_defaults(cfg.model, cfg.adapter or None)}
        self.name = served_name(cfg)
        bank = getattr(model, "adapter_bank", None)
        self.names = [self.name] + (bank.names if bank else [])  # adapter id = index
        self.context = min(cfg.max_len, model.config.max_seq_len) if cfg.max_len > 0 else model.config.max_seq_len
        self.api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("NANOHUATUO_API_KEY") or None
        origins = cfg.cors_origin.strip()
        self.cors = set() if origins in ("", "none") else {o.strip() for o in origins.split(",") if o.strip()}
        self.api = OpenAIProtocol(tok, template, defaults, self.context, cfg.batch_size, self.names,
                                  sorted(stop_token_ids(tok, template)), stop_strings(template))
        self.created = int(time.time())
        # a multi-turn client's next request may find its conversation's keys still in a free row
        engine = engine or Engine(model, tokenizer=tok, slots=cfg.batch_size, max_len=self.context,
                                  compile=cfg.compile, keep_prefixes=True)
        self.runner = EngineLoop(engine, tok, capacity=cfg.batch_size + cfg.max_queue)

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

    def end_headers(self):
        # every answer (errors, event streams and preflights too) says which origins may read it
        headers = getattr(self, "headers", None)  # absent when the request line itself was refused
        origin = headers.get("Origin") if headers is not None else None
        allowed = self.svc.cors
        if "*" in allowed and origin:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif allowed:  # a list: the origin is named back if it is on it, else the browser withholds the answer
            if origin in allowed:
                self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

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
            # the page is public (a browser cannot send a key to load it; it asks for one); /health too;
            # a CORS preflight never carries the key (the browser sends it on the request that follows)
            public = path in ("/", "/health", "/index.html") or self.command == "OPTIONS"
            if not public and not self.authorized():
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

    do_HEAD = do_GET  # a load balancer's health check may ask with HEAD

    def do_PUT(self):  # the standard library answers an unknown method 501; a known route with another is 405
        self.send_error_body(APIError(405, f"method {self.command} is not allowed; use GET or POST",
                                      code="method_not_allowed", headers={"Allow": "GET, HEAD, POST, OPTIONS"}))
        self.close_connection = True  # its body, if any, was not read

    do_DELETE = do_PATCH = do_PUT

    def do_POST(self):
        self.route({"/v1/chat/completions": self.chat, "/v1/completions": self.completions})

    def do_OPTIONS(self):
        paths = ("/", "/index.html", "/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
        self.route({p: self.preflight for p in paths})

    # --- routes

    def page(self):
        self.send_bytes(200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8",
                        {"Cache-Control": "no-cache"})

    def preflight(self):
        """A browser's CORS preflight: the methods and headers the request that follows may use."""
        headers = {"Allow": "GET, HEAD, POST, OPTIONS", "Content-Length": "0"}
        origin = self.headers.get("Origin")
        if origin and ("*" in self.svc.cors or origin in self.svc.cors):
            headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                            "Access-Control-Allow-Headers": self.headers.get("Access-Control-Request-Headers")
                            or "Authorization, Content-Type",
                            "Access-Control-Max-Age": "600"})
        self.send_response_only(204)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.log_line(204)

    def health(self):
        r = self.svc.runner
        self.send_json(200, {"status": "ok", "model": self.svc.name, "in_flight": r.in_flight,
                             "capacity": r.capacity, "cancelled": r.cancelled})

    def model_card(self, name):
        """A served model as /v1/models lists it; an adapter names its base in `parent`, as vLLM's."""
        svc = self.svc
        return {"id": name, "object": "model", "created": svc.created, "owned_by": "nanohuatuo",
                "root": svc.name, "parent": None if name == svc.name else svc.name, "max_model_len": svc.context}

    def models(self):
        self.send_json(200, {"object": "list", "data": [self.model_card(n) for n in self.svc.names]})

    def model_info(self):
        name = self.path.split("?", 1)[0][len("/v1/models/"):]
        self.svc.api.adapter_of({"model": name})  # 404 for a name not served
        self.send_json(200, self.model_card(name))

    def chat(self, body):
        self.answer(self.svc.api.chat_job(body), "chatcmpl")

    def completions(self, body):
        self.answer(self.svc.api.completion_job(body), "cmpl")

    # --- answering

    def answer(self, job, prefix):
        svc = self.svc
        want, capacity = len(job.prompts) * job.n, svc.runner.capacity
        if want > capacity:  # would never fit: not a reason to retry
            raise APIError(400, f"the request needs {want} sequences (prompts x n); this server holds at most "
                                f"{capacity} (--batch-size plus --max-queue)", param="n", code="invalid_value")
        try:
            chat = job.kind == "chat"
            ticket = svc.runner.submit(job.prompts, job.params, job.n, job.stops, strip_end=chat, adapter=job.adapter,
                                       prompt_only=job.prompt_only, end_stops=svc.api.template_stops if chat else ())
        except QueueFull:
            raise APIError(429, f"the server is busy ({capacity} sequences in flight or waiting); "
                                f"retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:  # the engine refused a prompt
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": job.model,
                "system_fingerprint": "nanohuatuo"}
        try:
            if job.stream:
                self.stream_answer(job, ticket, head)
            else:
                self.whole_answer(job, ticket, head)
        finally:
            svc.runner.cancel(ticket)  # a no-op once every choice finished; frees the rows of a client gone
        u = svc.api.usage(ticket)
        cached = u["prompt_tokens_details"]["cached_tokens"]
        self.log_line(200, f" {u['prompt_tokens']} prompt{f' ({cached} cached)' if cached else ''} + "
                           f"{u['completion_tokens']} completion tokens, "
                           f"{time.perf_counter() - ticket.t0:.2f} s")

    def messages(self, ticket):
        """(index, text, logprobs, finish_reason) from the engine thread, until every choice finished;
        the client is checked whenever nothing came for a moment."""
        try:
            yield from ticket.pieces(idle=self.check_client)
        except GenerationFailed as e:
            raise APIError(500, str(e), type="server_error") from None

    def echo_logprobs(self, job, ticket, index, lps):
        """A completion choice's logprobs object: with echo, the prompt's tokens and log-probs first."""
        api = self.svc.api
        echo = job.echo[index // job.n] if job.echo else ""
        answer = api.completion_logprobs(lps, len(echo)) if lps or not job.echo else None
        if not job.echo:
            return answer
        prompt = job.prompts[index // job.n]
        return joined_logprobs(api.prompt_logprobs(prompt, ticket.choices[index].prompt_logprobs), answer)

    def whole_answer(self, job, ticket, head):
        api = self.svc.api
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
                                "logprobs": api.chat_logprobs(lps[c.index]) if job.logprobs else None,
                                "finish_reason": c.finish_reason})
            else:
                echo = job.echo[c.index // job.n] if job.echo else ""
                choices.append({"index": c.index, "text": echo + texts[c.index],
                                "logprobs": self.echo_logprobs(job, ticket, c.index, lps[c.index])
                                if job.logprobs else None,
                                "finish_reason": c.finish_reason})
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        self.send_json(200, {**head, "object": obj, "choices": choices, "usage": api.usage(ticket)})

    def stream_answer(self, job, ticket, head):
        api = self.svc.api
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
                          "logprobs": api.chat_logprobs(lps) if job.logprobs and lps else None,
                          "finish_reason": reason}
            else:
                choice = {"index": index, "text": text,
                          "logprobs": api.completion_logprobs(lps, echo_len[index]) if job.logprobs and lps else None,
                          "finish_reason": reason}
            self.event({**base, "choices": [choice], **({"usage": usage} if usage else {})})

        def echo_chunk(index):
            # sent with the choice's first piece: the prompt's log-probs come with the first token
            logprobs = api.prompt_logprobs(job.prompts[index // job.n], ticket.choices[index].prompt_logprobs) \
                if job.logprobs else None
            self.event({**base, "choices": [{"index": index, "text": job.echo[index // job.n], "logprobs": logprobs,
                                             "finish_reason": None}]})

        if chat:
            for c in ticket.choices:
                chunk(c.index, "", [], None, role=True)
        echoed = set()
        try:
            for index, text, lps, reason in self.messages(ticket):
                if job.echo and index not in echoed:
                    echoed.add(index)
                    echo_chunk(index)
                if text or lps:
                    chunk(index, text, lps, None)
                if reason is not None:
                    unfinished -= 1
                    # usage in every answer: on the last chunk, unless asked for as a chunk of its own
                    last = not unfinished and not job.include_usage
                    chunk(index, "", [], reason, usage=api.usage(ticket) if last else None)
        except APIError as e:  # the engine failed after the answer began: say so in the stream
            self.event(e.body())
        if job.include_usage:
            self.event({**base, "choices": [], "usage": api.usage(ticket)})
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
        model, tok, template = load_model(cfg)
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

NAME is the model directory's name (the adapter's with --adapter; or --served-model-name); GET /v1/models
lists it. Routes: /v1/chat/completions, /v1/completions, /v1/models, /health (no key needed) and / (the
chat page).
Models are not medical advice: everything they say must be checked by a doctor."""


def main(argv=None) -> int:
    return cli_main(run, ServeConfig, argv, prog="serve.py", description=USAGE)


if __name__ == "__main__":
    sys.exit(main())
