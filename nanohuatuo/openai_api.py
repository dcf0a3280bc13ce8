"""The OpenAI API's requests and answers, apart from HTTP: what serve.py checks and what it writes.

    api = OpenAIProtocol(tok, template, defaults, context, slots, names=["base", "lora-a"])
    job = api.chat_job(body)        # a checked request (APIError 400/404 naming the field otherwise)
    job = api.completion_job(body)
    api.chat_logprobs(...), api.completion_logprobs(...), api.usage(ticket)   # the answer's pieces

Strictness: a field this server would not honour (penalties, `logit_bias`, `response_format`,
`tools`, ...) is refused with a 400 naming it, rather than silently ignored, unless it holds the
neutral value clients send by default (presence_penalty 0, `response_format` {"type": "text"},
an empty `tools` list ...): an answer must never look as if a constraint held that did not.
Fields OpenAI defines that change nothing here (`user`, `metadata`, `store`, ...) and fields we do
not know at all are ignored, as OpenAI and vLLM do.

vLLM's own fields this server does not honour (`guided_json` and the other guided decoding,
`structured_outputs`, `include_stop_str_in_output`, `prompt_logprobs`, `truncate_prompt_tokens`;
on chat `echo`, `add_generation_prompt` false, `continue_final_message`, `chat_template`) are
refused the same way. A number must be finite (JSON's NaN is refused by name).

Defaults as OpenAI's: `max_tokens` left out is what the context leaves on chat and 16 on
/v1/completions (OpenAI's and vLLM's default for a raw completion).

Extensions, as vLLM has them: `model` may be left out (the base model answers); `top_k`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids` (more token ids that end an answer, the
token not in the text); `chat_template_kwargs` passed to a Jinja chat template (e.g.
Qwen3's `enable_thinking`); on /v1/completions `echo` with `logprobs` returns the prompt tokens'
log-probs too (the first token's is null) and `max_tokens` 0 with `echo` scores a prompt without
generating: the request shape of lm-evaluation-harness's loglikelihood tasks.

Messages: content is a string or an array of text parts (joined with newlines, as vLLM joins
them); a user or system message without content, or with an empty array, is refused, as is an
assistant message with `tool_calls` (this server has no tools). Which orders of roles a
conversation may take is the chat template's to say: a model's own Jinja template renders what it
accepts (it may raise, as Llama-2's does for roles that do not alternate: a 400 with its message);
a named template needs system? (user assistant)* user.
"""

import json
import math
import re
from dataclasses import dataclass

from .engine import SamplingParams
from .httpjson import APIError, type_name
from .templates import render_prompt
from .tokenizer import StreamDecoder

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; a few more cost nothing)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (5 for completions)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# fields this server does not honour, each with the test for the neutral value clients send by default
UNHONOURED = {
    "presence_penalty": ("0", lambda v: v == 0),
    "frequency_penalty": ("0", lambda v: v == 0),
    "logit_bias": ("{}", lambda v: v == {}),
    "response_format": ('{"type": "text"}', lambda v: v == {"type": "text"}),
    "tools": ("[]", lambda v: v == []),
    "functions": ("[]", lambda v: v == []),
    "tool_choice": ('"none"', lambda v: v in ("none", "auto")),  # with no tools, "auto" chooses none
    "function_call": ('"none"', lambda v: v in ("none", "auto")),
    "suffix": ('""', lambda v: v == ""),
    "best_of": ("1", lambda v: v == 1),
    "min_p": ("0", lambda v: v == 0),  # vLLM's extensions
    "min_tokens": ("0", lambda v: v == 0),
    "include_stop_str_in_output": ("false", lambda v: v is False),
    "guided_json": ("null", lambda v: False),
    "guided_regex": ("null", lambda v: False),
    "guided_choice": ("null", lambda v: False),
    "guided_grammar": ("null", lambda v: False),
    "structured_outputs": ("null", lambda v: False),
    "prompt_logprobs": ("null", lambda v: False),
    "truncate_prompt_tokens": ("null", lambda v: False),
}
# the same on chat only: completions honour `echo`
CHAT_UNHONOURED = {
    "echo": ("false", lambda v: v is False),
    "add_generation_prompt": ("true", lambda v: v is True),
    "continue_final_message": ("false", lambda v: v is False),
    "chat_template": ("null", lambda v: False),
}
# names a chat template sets itself; chat_template_kwargs cannot replace them
TEMPLATE_NAMES = {"messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token"}


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
    model: str  # the served name the request asked for
    adapter: int = 0  # the LoRA adapter it runs under (0: the base)
    echo: list | None = None  # completions with echo: the prompt text per prompt
    prompt_only: bool = False  # max_tokens 0 with echo: score the prompt, generate nothing


def token_limit_field(body) -> str:
    """Which of the two names of the answer's token limit a request uses: max_completion_tokens wins."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def get_field(body, name, kinds, default=None, lo=None, hi=None):
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
    if isinstance(v, float) and not math.isfinite(v):  # Python's JSON reads NaN and Infinity
        raise APIError(400, f"'{name}' is {v}; it must be a finite number", param=name, code="invalid_value")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{name}' is {v}; it must be {bound}", param=name, code="invalid_value")
    return v


def refuse_unhonoured(body, fields=UNHONOURED):
    """A 400 naming the first field the server would ignore; neutral values (and null) pass."""
    for name, (neutral, is_neutral) in fields.items():
        v = body.get(name)
        if v is not None and not is_neutral(v):
            raise APIError(400, f"'{name}' is not supported by this server (it would be ignored, so the answer "
                                f"would not honour it); leave it out or send {neutral}", param=name,
                           code="unsupported_parameter")


def stop_list(body):
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


def message_content(message, i):
    content = message.get("content")
    if content is None or content == []:
        if message.get("role") != "assistant":  # only an assistant's may be empty (OpenAI: with tool calls)
            raise APIError(400, f"messages[{i}].content is required for a {message.get('role')} message: a string "
                                f"or a non-empty array of text parts", param=f"messages[{i}].content",
                           code="missing_required_parameter")
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
        return "\n".join(texts)
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
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, f"messages[{i}] has tool calls, which this server does not support (no tools)",
                           param=f"messages[{i}].tool_calls", code="invalid_value")
        out.append({"role": ROLES[role], "content": message_content(m, i)})
    return out


def template_variables(body):
    """`chat_template_kwargs`: an object of extra names for the chat template, reserved names refused."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return None
    if not isinstance(kw, dict):
        raise APIError(400, f"'chat_template_kwargs' must be an object, got {type_name(kw)}",
                       param="chat_template_kwargs", code="invalid_type")
    taken = sorted(TEMPLATE_NAMES & set(kw))
    if taken:
        raise APIError(400, f"'chat_template_kwargs' cannot set {', '.join(taken)} (the server sets them)",
                       param="chat_template_kwargs", code="invalid_value")
    return kw


class OpenAIProtocol:
    """Checks requests against one tokenizer, template and context window and shapes the answers.

    names: the served model names, the base's first and then each LoRA adapter's (adapter id =
    index); defaults: what a request leaves out (temperature, top_p, top_k, repetition_penalty)."""

    def __init__(self, tok, template, defaults, context, slots, names, chat_stop_ids, template_stops):
        self.tok, self.template, self.defaults = tok, template, defaults
        self.context, self.slots, self.names = context, slots, list(names)
        self.chat_stop_ids = tuple(chat_stop_ids)
        self.raw_stop_ids = tuple(sorted(tok.stop_ids))
        self.template_stops = list(template_stops)

    # --- checking requests

    def adapter_of(self, body):
        """(served name, adapter id) the request asks for; no 'model' means the base, as in vLLM."""
        model = body.get("model")
        if model is None:
            return self.names[0], 0
        if not isinstance(model, str):
            raise APIError(400, f"'model' must be a string, got {type_name(model)}", param="model",
                           code="invalid_type")
        if model not in self.names:
            raise APIError(404, f"The model {model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.names))}", param="model", code="model_not_found")
        return model, self.names.index(model)

    def generation_params(self, body, prompt_len, chat, zero_ok=False):
        """SamplingParams from the request fields, checked against the context window."""
        limit = self.context - prompt_len
        if limit < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, but the prompt is "
                                f"{prompt_len} tokens; shorten the {'messages' if chat else 'prompt'}",
                           param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        name = token_limit_field(body)
        max_tokens = get_field(body, name, ["integer"], default=None if chat else min(16, limit))
        if max_tokens is not None and max_tokens < (0 if zero_ok else 1):
            need = "at least 1 (0 only with 'echo': true)" if not chat else "at least 1"
            raise APIError(400, f"'{name}' is {max_tokens}; it must be {need}", param=name, code="invalid_value")
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; you asked for "
                                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} in the "
                                f"answer); lower '{name}' to at most {limit}", param=name,
                           code="context_length_exceeded")
        seed = get_field(body, "seed", ["integer"])
        ignore_eos = get_field(body, "ignore_eos", ["boolean"], default=False)  # vLLM's extension, for benchmarks
        stop_ids = () if ignore_eos else (self.chat_stop_ids if chat else self.raw_stop_ids)
        d = self.defaults
        return SamplingParams(
            max_new_tokens=max_tokens or limit if max_tokens != 0 else 1,  # 0: one token, dropped (prompt_only)
            temperature=float(get_field(body, "temperature", ["number"], d["temperature"], 0, 2)),
            top_p=float(get_field(body, "top_p", ["number"], d["top_p"], 0, 1)),
            top_k=max(0, get_field(body, "top_k", ["integer"], d["top_k"], -1, None)),  # vLLM's extension; -1: off
            repetition_penalty=float(get_field(body, "repetition_penalty", ["number"], d["repetition_penalty"],
                                               0.01, 10)),
            stop_ids=tuple(dict.fromkeys(stop_ids + self.extra_stop_ids(body))),  # ignore_eos keeps the asked
            seed=None if seed is None else seed % 2**63,
        )

    def extra_stop_ids(self, body):
        """vLLM's `stop_token_ids`: more tokens that end an answer (not written in its text)."""
        ids = body.get("stop_token_ids")
        if ids is None:
            return ()
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError(400, "'stop_token_ids' must be an array of token ids", param="stop_token_ids",
                           code="invalid_type")
        if any(not 0 <= i < self.tok.vocab_size for i in ids):
            raise APIError(400, f"'stop_token_ids': token ids must be in [0, {self.tok.vocab_size})",
                           param="stop_token_ids", code="invalid_value")
        return tuple(ids)

    def common(self, body, job_kwargs):
        n = get_field(body, "n", ["integer"], 1)
        if not 1 <= n <= self.slots:
            raise APIError(400, f"'n' is {n}; it must be between 1 and {self.slots} (the server's --batch-size)",
                           param="n", code="invalid_value")
        stream = get_field(body, "stream", ["boolean"], False)
        options = body.get("stream_options")
        if options is not None and not stream:  # as OpenAI and vLLM answer it
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                           code="invalid_value")
        options = options or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        include_usage = get_field(options, "include_usage", ["boolean"], False)
        return Job(n=n, stream=stream, include_usage=bool(stream and include_usage), **job_kwargs)

    def chat_job(self, body) -> Job:
        model, adapter = self.adapter_of(body)
        refuse_unhonoured(body)
        refuse_unhonoured(body, CHAT_UNHONOURED)
        messages = chat_messages(body)
        try:
            prompt = render_prompt(messages, self.tok, self.template, template_variables(body))
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        params = self.generation_params(body, len(prompt), chat=True)
        logprobs = get_field(body, "logprobs", ["boolean"], False)
        top = get_field(body, "top_logprobs", ["integer"], 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        params.logprobs, params.top_logprobs = logprobs, top
        return self.common(body, dict(kind="chat", prompts=[prompt], params=params,
                                      stops=stop_list(body) + self.template_stops, logprobs=logprobs,
                                      top_logprobs=top, model=model, adapter=adapter))

    def completion_job(self, body) -> Job:
        model, adapter = self.adapter_of(body)
        refuse_unhonoured(body)
        prompts = self.raw_prompts(body.get("prompt"))
        echo = get_field(body, "echo", ["boolean"], False)
        params = self.generation_params(body, max(len(p) for p in prompts), chat=False, zero_ok=echo)
        top = get_field(body, "logprobs", ["integer"], None, 0, 5)
        params.logprobs, params.top_logprobs = top is not None, top or 0
        params.prompt_logprobs = echo and top is not None
        return self.common(body, dict(kind="completion", prompts=prompts, params=params, stops=stop_list(body),
                                      logprobs=top is not None, top_logprobs=top or 0, model=model, adapter=adapter,
                                      echo=[self.tok.decode(p) for p in prompts] if echo else None,
                                      prompt_only=body.get(token_limit_field(body)) == 0))

    def raw_prompts(self, prompt):
        """Token ids per prompt: a string, an array of strings, an array of ids or of id arrays."""
        if prompt is None:
            raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "'prompt' must be a string, an array of strings or of token ids", param="prompt",
                           code="invalid_type")
        if len(prompt) > self.slots:
            raise APIError(400, f"'prompt' holds {len(prompt)} prompts; at most {self.slots}", param="prompt",
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
        """(text, bytes) of one token as logprobs show it; a byte-fallback piece that is part of a
        character (not ASCII) is written as OpenAI does, "\\xe5", with its byte; an ASCII one ("<0x0A>")
        is its character."""
        piece = self.tok.id_to_token(token) or ""
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            byte = int(m.group(1), 16)
            return (chr(byte) if byte < 0x80 else "\\x" + m.group(1).lower()), [byte]
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

    def prompt_logprobs(self, prompt, scored):
        """The echoed prompt's completion logprobs: its first token with null log-probs (nothing
        predicts it), then the engine's (token, logprob, top) of the rest; text offsets where each
        token's text begins in the decoded prompt."""
        decoder, offsets, length = StreamDecoder(self.tok), [], 0
        for t in prompt:
            offsets.append(length)
            length += len(decoder.put(t))
        rows = [(prompt[0], None, None)] + [tuple(s) for s in scored]
        return self.completion_logprobs([(t, lp, top, offsets[i]) for i, (t, lp, top) in enumerate(rows)], 0)

    @staticmethod
    def usage(ticket):
        completion = sum(c.tokens for c in ticket.choices)
        # cached: prompt tokens the engine did not compute again, their keys kept from an earlier request
        # (a conversation's previous turn); OpenAI and vLLM report them under the same name
        return {"prompt_tokens": ticket.prompt_tokens, "completion_tokens": completion,
                "total_tokens": ticket.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c.cached for c in ticket.choices)}}


def joined_logprobs(first, then):
    """Two completion logprobs objects (the echoed prompt's, the answer's) as one."""
    if then is None:
        return first
    return {k: first[k] + then[k] for k in first}
