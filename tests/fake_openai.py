"""A scripted OpenAI-compatible HTTP server for tests (standard library only).

    def handler(request: dict, path: str):
        return "reply text"                       # wrapped as a chat.completions response
        return ["a", "b"]                         # one choice per text (n > 1)
        return {"choices": []}                    # a dict is sent as the JSON body
        return (429, {"error": {...}}, {"retry-after": "0"})   # status, body, headers
        return b"<html>not json</html>"           # bytes are sent raw (200)

    with ScriptedServer(handler) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        ...
        srv.requests     # [(path, json), ...] in the order received

It listens on 127.0.0.1 on a free port, serves from a background thread and answers
POST /v1/chat/completions (stream=False only) and GET /v1/models. A handler that raises
answers 500 with the exception text, so a test sees the failure instead of a hang.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text, request: dict | None = None, finish_reason: str = "stop",
               prompt_tokens: int | None = None, completion_tokens: int | None = None) -> dict:
    """A chat.completions response body holding one reply (or several, if text is a list).

    Token counts default to whitespace-split word counts of the prompt and the reply, so tests
    can predict the usage totals."""
    request = request or {}
    texts = text if isinstance(text, list) else [text]
    reasons = finish_reason if isinstance(finish_reason, list) else [finish_reason] * len(texts)
    if prompt_tokens is None:
        prompt_tokens = sum(len(str(m.get("content", "")).split())
                            for m in request.get("messages", []))
    if completion_tokens is None:
        completion_tokens = sum(len((t or "").split()) for t in texts)
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "test-model"),
        "choices": [{"index": i, "finish_reason": r,
                     "message": {"role": "assistant", "content": t}}
                    for i, (t, r) in enumerate(zip(texts, reasons))],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "test_error", "code": status}}


class ScriptedServer:
    """Serve handler(request_json, path) over HTTP until the with-block ends."""

    def __init__(self, handler, models=("test-model",)):
        self.handler = handler
        self.models = list(models)
        self._lock = threading.Lock()
        self._requests: list[tuple[str, dict]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[tuple[str, dict]]:
        with self._lock:
            return list(self._requests)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _record(self, path: str, body: dict) -> None:
        with self._lock:
            self._requests.append((path, body))

    def start(self) -> "ScriptedServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

            def log_message(self, *args):  # quiet: tests read their own output
                pass

            def _send(self, status: int, body, headers: dict | None = None) -> None:
                if isinstance(body, (dict, list)):
                    data = json.dumps(body, ensure_ascii=False).encode()
                    ctype = "application/json"
                elif isinstance(body, bytes):
                    data, ctype = body, "text/html"
                else:
                    data, ctype = str(body).encode(), "text/plain; charset=utf-8"
                self.send_response(status)
                headers = {k.lower(): v for k, v in (headers or {}).items()}
                self.send_header("Content-Type", headers.pop("content-type", ctype))
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)

            def _path(self) -> str:
                return self.path.split("?", 1)[0].rstrip("/")

            def do_GET(self):
                path = self._path()
                server._record(path, {})
                if path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"}
                        for m in server.models]})
                else:
                    self._send(404, _error(404, f"no route GET {path}"))

            def do_POST(self):
                path = self._path()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    server._record(path, {"_raw": raw.decode("utf-8", "replace")})
                    self._send(400, _error(400, "request body is not JSON"))
                    return
                server._record(path, body)
                if not path.endswith("/chat/completions"):
                    self._send(404, _error(404, f"no route POST {path}"))
                    return
                if body.get("stream"):
                    self._send(400, _error(400, "the test server does not stream"))
                    return
                try:
                    reply = server.handler(body, path)
                except Exception as e:  # surfaced to the client, never a hung request
                    self._send(500, _error(500, f"handler raised {type(e).__name__}: {e}"))
                    return
                if isinstance(reply, tuple):
                    status, payload, *rest = reply
                    headers = rest[0] if rest else None
                    if isinstance(payload, str) and 200 <= status < 300:
                        payload = completion(payload, body)
                    self._send(status, payload, headers)
                elif isinstance(reply, (str, list)):
                    self._send(200, completion(reply, body))
                else:
                    self._send(200, reply)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
