"""JSON over HTTP on the standard library: the error body, request bodies, JSON answers, event streams.

    class Handler(JSONHandler):
        def do_POST(self):
            body = self.json_body(self.read_body(max_bytes))   # APIError 400/411/413 when it is not one
            self.send_json(200, {...})
            # or: self.begin_event_stream(); self.event({...}); ...; self.end_event_stream()

What a stage's server shares with any other: an APIError carries the HTTP status and an
OpenAI-style error body ({"error": {message, type, param, code}}); an event stream is server-sent
events in a chunked HTTP/1.1 body (to an HTTP/1.0 client, the body up to the connection's close),
and a client that went away (EOF on its socket, or a failed write) raises ClientGone, so the
caller can stop work that nobody will read.
"""

import json
import select
import socket
from http.server import BaseHTTPRequestHandler


class APIError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


def type_name(v):
    """The JSON name of a value's type, for error messages ("integer", "array", "null", ...)."""
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that answers in JSON (errors too) and can stream server-sent events."""
    protocol_version = "HTTP/1.1"  # keep-alive: clients such as openai's reuse their connections
    chunked = True  # an event stream's body in chunks (begin_event_stream: not to an HTTP/1.0 client)

    def log_message(self, fmt, *args):  # a subclass logs one line per request its own way
        pass

    def send_error(self, code, message=None, explain=None):
        # what the standard library answers itself (a garbled request line, an unknown method): in JSON too
        self.close_connection = True
        self.send_json(code, APIError(code, message or explain or "bad request").body())

    def send_json(self, status, obj, headers=None):
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                        "application/json; charset=utf-8", headers)

    def send_bytes(self, status, data, content_type, headers=None):
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers GET would send, Content-Length included, no body
            self.wfile.write(data)

    def read_body(self, max_bytes):
        """The request body's bytes (Content-Length only); a refused body closes the connection."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length (chunked request bodies are not supported)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > max_bytes:
            self.close_connection = True
            status, left = (413 if length > max_bytes else 400), length
            if max_bytes < length <= 8 * max_bytes:
                # read and dropped: closing with the body unread resets the connection, and the client sees
                # a broken pipe (and retries) instead of this answer
                while left > 0:  # (an empty read: the client stopped sending, nothing left to drop)
                    left -= len(self.rfile.read(min(left, 2**20))) or left
            raise APIError(status, f"the request body must be at most {max_bytes} bytes with a valid Content-Length")
        return self.rfile.read(length)

    @staticmethod
    def json_body(raw):
        """The body as a JSON object, or APIError 400 saying what is wrong with it."""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type_name(body)}", code="invalid_type")
        return body

    def client_gone(self):
        """True if the client closed its end (EOF on the socket); cheap enough to check between tokens."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def check_client(self):
        if self.client_gone():
            raise ClientGone()

    # --- server-sent events in a chunked body

    def begin_event_stream(self):
        self.send_response_only(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        # an HTTP/1.0 client cannot read chunks: its body is the bytes until the connection closes
        self.chunked = self.request_version != "HTTP/1.0"
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def write_chunk(self, data: bytes):
        """One piece of the stream's body: a chunk (HTTP/1.1), or the bytes themselves (HTTP/1.0)."""
        self.check_client()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        except OSError:
            raise ClientGone() from None

    def event(self, obj):
        self.write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def end_event_stream(self, last=b"data: [DONE]\n\n"):
        """Send the last event (OpenAI's `[DONE]` by default) and end the chunked body."""
        if last:
            self.write_chunk(last)
        if not self.chunked:
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            raise ClientGone() from None
