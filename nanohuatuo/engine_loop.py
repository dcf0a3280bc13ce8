"""One engine thread, many clients: the serving loop between an `Engine` and a server's requests.

`EngineLoop` owns the one thread that calls `engine.step()` and turns each request's tokens into text
on its ticket's queue: decoded incrementally (a StreamDecoder, so no half characters), cut at stop
strings, with text that may be the start of one held back. `QueueFull` and `GenerationFailed` are
what a caller sees when the loop is full or a step failed. It is kept apart from engine.py because
the engine knows nothing of threads or clients: `Engine.step` runs on one thread and returns token
events, and this module is the one place that turns them into text streamed to many callers.
"""

import queue
import sys
import threading
import time

import torch

from .tokenizer import StreamDecoder


def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class Choice:
    """One answer being generated: its text so far, what was sent, its pending logprobs."""

    def __init__(self, index, rid, tok, stops, strip_end, end_stops=()):
        self.index, self.rid = index, rid
        self.decoder = StreamDecoder(tok)
        self.stops, self.strip_end, self.end_stops = stops, strip_end, set(end_stops)
        self.text, self.sent = "", 0
        self.stopped = None  # the stop string found (the text is cut before it), if one was
        self.trim = False  # the answer ended at the template's end: its trailing white space is dropped
        self.tokens = 0  # generated tokens, the stop token included (what usage counts)
        self.cached = 0  # prompt tokens whose keys the engine kept from an earlier request (usage's cached_tokens)
        self.logprobs = []  # (token, logprob, top, offset in text) not yet sent
        self.prompt_logprobs = []  # (token, logprob, top) of prompt tokens 1.., if asked for; set before the first piece
        self.finish_reason = None

    def put(self, token):
        """Add a token's text; True if a stop string is now complete (the text is cut before it)."""
        piece = self.decoder.put(token)
        if not piece:
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=1) + 1)
        self.text += piece
        return self._cut(start)

    def _cut(self, start=0):
        hits = sorted((i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0)
        if hits:
            self.text = self.text[:hits[0][0]]
            self.stopped = hits[0][1]
        return bool(hits)

    def close(self, reason):
        """The answer is complete: take what the decoder still holds (never a half character)."""
        if self.stopped is None:
            self.text += self.decoder.flush().rstrip("\ufffd")
            self._cut()
        self.finish_reason = "stop" if self.stopped is not None else reason
        # a stop token, or the template's end spelled as text: the end of the template's turn
        at_end = self.stopped is None or self.stopped in self.end_stops
        self.trim = self.strip_end and reason == "stop" and at_end

    def take(self):
        """(new text safe to send, its logprobs): held back is what might start a stop string and, with
        strip_end (chat), trailing white space until the answer is over: a template may put a space or
        newline before its end token, which is not the answer's; an answer cut by the client's stop
        string or by its length keeps its white space, as OpenAI's and vLLM's do."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= held_back(self.text, self.stops)
            if self.strip_end:
                end = len(self.text[:end].rstrip())
        elif self.trim:
            end = len(self.text.rstrip())
        delta = self.text[self.sent:end] if end > self.sent else ""
        if not delta and self.finish_reason is None:
            return "", []
        self.sent = max(self.sent, end)
        lps, self.logprobs = self.logprobs, []
        return delta, lps


class QueueFull(Exception):
    """EngineLoop.submit: the sequences in flight plus this request's would exceed the capacity."""


class GenerationFailed(RuntimeError):
    """Ticket.pieces: the engine step (or the loop around it) failed while the request ran."""


class Ticket:
    """A submitted request: its choices and the queue the engine thread answers on."""

    def __init__(self, params, prompt_tokens, prompt_only=False):
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.prompt_only = prompt_only  # the one generated token is dropped: only the prompt's log-probs are wanted
        self.choices = []
        self.queue = queue.Queue()  # ("delta", index, text, logprobs, finish_reason) | ("error", message)
        self.t0 = time.perf_counter()

    def pieces(self, idle=None, poll=0.2):
        """(index, text, logprobs, finish_reason) as the engine thread sends them, until every choice
        finished. idle() is called every `poll` seconds, whether pieces came or not (it may raise, to
        give up: the caller then cancels the ticket; a client that timed out on a whole answer still
        being written must free its rows too). A failed generation raises GenerationFailed."""
        unfinished, checked = len(self.choices), time.monotonic()
        while unfinished:
            try:
                item = self.queue.get(timeout=poll)
            except queue.Empty:
                item = None
            if idle is not None and time.monotonic() - checked >= poll:
                idle()
                checked = time.monotonic()
            if item is None:
                continue
            if item[0] == "error":
                raise GenerationFailed(item[1])
            unfinished -= item[4] is not None
            yield item[1:]


class EngineLoop:
    """Owns an Engine and the one thread that steps it; turns each request's tokens into text on its
    ticket's queue. Text is decoded incrementally (a StreamDecoder: no half characters), a stop string
    ends the request as soon as it is complete, and text that may be the start of one is held back.

        loop = EngineLoop(engine, tok, capacity=80); loop.start()
        ticket = loop.submit([prompt_ids], SamplingParams(...), n=2, stops=["\\n\\n"])   # any thread
        for index, text, logprobs, finish_reason in ticket.pieces(): ...
        loop.cancel(ticket)   # a client gone: its rows are freed at the next step
        loop.stop()
    """

    def __init__(self, engine, tok, capacity):
        self.engine, self.tok, self.capacity = engine, tok, capacity
        self.lock = threading.Lock()  # guards rows and in_flight, and keeps add/cancel paired with them
        self.rows = {}  # rid -> (ticket, choice)
        self.in_flight = 0  # sequences added and not finished
        self.cancelled = 0  # sequences cancelled before they finished (their client went away)
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.fail_all("the server is shutting down", log=False)  # no waiting caller blocks for ever

    def submit(self, prompts, params, n=1, stops=(), strip_end=False, adapter=0, prompt_only=False,
               end_stops=()) -> Ticket:
        """Add n samples of each prompt (under LoRA adapter `adapter`, 0: the base); raises QueueFull
        (retry later) or ValueError (a prompt the engine refuses, or more sequences than the capacity:
        neither is worth a retry). prompt_only: one token is generated and dropped (finish_reason
        "length", no text, not counted), for a client that wants the prompt's log-probs alone. strip_end
        (chat): white space before the template's end (a stop token, or one of `end_stops`, the
        template's stop strings among `stops`) is not the answer's."""
        ticket = Ticket(params, sum(len(p) for p in prompts), prompt_only)
        want = len(prompts) * n
        if want > self.capacity:
            raise ValueError(f"the request needs {want} sequences; at most {self.capacity} fit")
        with self.lock:
            if self.in_flight + want > self.capacity:
                raise QueueFull()
            try:
                for prompt in prompts:
                    rids = self.engine.add(prompt, params, n=n, adapter=adapter)
                    for rid in rids if isinstance(rids, list) else [rids]:
                        choice = Choice(len(ticket.choices), rid, self.tok, stops, strip_end, end_stops)
                        ticket.choices.append(choice)
                        self.rows[rid] = (ticket, choice)
            except ValueError:  # the engine refused a prompt: take back what was added
                for c in ticket.choices:
                    self.engine.cancel(c.rid)
                    del self.rows[c.rid]
                raise
            self.in_flight += want
        self.wake.set()
        return ticket

    def cancel(self, ticket):
        """Drop a request's unfinished rows (the client went away); their slots free at the next step."""
        with self.lock:
            for choice in ticket.choices:
                if self.rows.pop(choice.rid, None) is not None:
                    self.engine.cancel(choice.rid)
                    self.in_flight -= 1
                    self.cancelled += 1

    @torch.inference_mode()
    def loop(self):
        while not self.stopping:
            self.wake.clear()  # cleared before the check, so an add between the two still wakes us
            if not self.engine.has_work():
                self.wake.wait(0.5)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                self.fail_all(f"generation failed: {type(e).__name__}: {e}")
                continue
            try:
                with self.lock:
                    for ev in events:
                        self.on_event(ev)
            except Exception as e:  # a bug here must not stop the thread every request waits on
                self.fail_all(f"internal error: {type(e).__name__}: {e}")

    def on_event(self, ev):
        row = self.rows.get(ev.rid)
        if row is None:  # cancelled while the step ran
            return
        ticket, choice = row
        choice.cached = ev.cached_tokens
        if ev.prompt_logprobs is not None:
            choice.prompt_logprobs = ev.prompt_logprobs
        reason = ev.finish_reason
        if ticket.prompt_only:
            if ev.finish_reason is None:
                self.engine.cancel(ev.rid)
            reason = "length"
        else:
            choice.tokens += 1
        stop_token = reason == "stop" and ev.token in ticket.params.stop_ids
        if not stop_token and not ticket.prompt_only:
            if ticket.params.logprobs:
                choice.logprobs.append((ev.token, ev.logprob, ev.top_logprobs, len(choice.text)))
            if choice.put(ev.token) and reason is None:
                reason = "stop"  # a stop string: the engine need not go on
                self.engine.cancel(ev.rid)
        if reason is not None:
            choice.close("stop" if reason == "stop" else "length")
            del self.rows[ev.rid]
            self.in_flight -= 1
        text, lps = choice.take()
        if text or lps or reason is not None:
            ticket.queue.put(("delta", choice.index, text, lps, choice.finish_reason))

    def fail_all(self, message, log=True):
        if log:
            print(f"error: {message}", file=sys.stderr, flush=True)
        with self.lock:
            tickets = {id(t): t for t, _ in self.rows.values()}
            for rid in list(self.rows):
                self.engine.cancel(rid)
            self.rows.clear()
            self.in_flight = 0
        for t in tickets.values():
            t.queue.put(("error", message))
