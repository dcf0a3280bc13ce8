"""Chat templates: a conversation -> token ids plus the loss mask of the tokens the model must learn.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`: an
optional system message first, then user and assistant turns alternating, starting with a
user turn (other keys, such as `reasoning_content`, are passed to a Jinja template as they are).

`resolve_template(model_dir, name)` gives the template a command uses, one of two kinds
(`ChatTemplate.kind`, decided when the template is made; `NamedKind` and `JinjaKind` below do the work):

* **The model's own chat template** (`--template auto`, the default): the Jinja text that ships
  in the model directory, rendered as transformers renders it (found, rendered and masked in
  jinja_template.py), so ids equal `apply_chat_template(messages, tokenize=True)`. A directory
  without a template falls back to a named one, with a printed line saying so: HuatuoGPT's,
  unless the directory's name or config.json points to another (`guess_template`:
  HuatuoGPT-II, Baichuan2, ...). Extra template variables (Qwen3's `enable_thinking`) go in
  `ChatTemplate.options` (`dataclasses.replace(template, options=(("enable_thinking", False),))`).
* **Named templates** (the TEMPLATES table: "huatuo" is HuatuoGPT v1, "huatuo2" HuatuoGPT-II,
  ...): the conversation is cut into segments (bos, system, each user turn, the separator
  between turns, the assistant opener, the answer with its end-of-turn token); each segment is
  tokenized on its own and the ids concatenated, so a mask covers whole segments exactly and
  a prompt is always a prefix of the training sequence. Inside a segment, the template's
  special tokens (`<|im_start|>`, `{eos}`, ...) become their ids directly and the text
  between them is encoded with `Tokenizer.encode`; only the first text of the sequence gets a
  sentencepiece prefix space (transformers' non-legacy Llama behaviour). Message contents are
  used verbatim.

Loss masks from a Jinja template follow the template's `{% generation %}` blocks, or else the
template itself (growing prefixes of the conversation; jinja_template.py says how). A template
that rewrites a turn once later turns follow (Qwen3 drops the reasoning of earlier answers)
learns that turn only where its text is what the model generates at inference; `render_turns`
gives such turns their own sequences (the conversation through that turn, rendered as the model
would see it), so every answer can be trained in its inference form. `save_chat_template`
writes the trained template into an output's tokenizer files.

For inference (chat, sampling, evaluation): `tokenizer_and_template(model_dir, adapter)` picks
the tokenizer and template a model was trained with, and `fit_prompt` fits a conversation into
`prompt_budget(...)` tokens by dropping whole earlier turns, raising `PromptTooLong` when the
system message and the last question alone do not fit. `stop_token_ids` / `stop_strings` end a
generated answer; `generation_defaults` reads a model's sampling values.
"""

import json
import re
import sys
from functools import lru_cache
from pathlib import Path

from nanohuatuo.hf import TOKENIZER_MODEL_FILES, read_json
from nanohuatuo.jinja_template import (  # ChatTemplate and find_chat_templates are re-exported: callers import them from here
    ChatTemplate,
    find_chat_templates,
    learned_spans,
    masked_ids,
    render_jinja_text,
    template_dir,
    turn_markers,
    write_chat_template,
)
from nanohuatuo.tokenizer import StreamDecoder, Tokenizer, special_tokens


HUATUO_SYSTEM = (
    "一位用户和智能医疗大模型HuatuoGPT之间的对话。对于用户的医疗问诊，HuatuoGPT给出准确的、详细的、温暖的指导建议。"
    "对于用户的指令问题，HuatuoGPT给出有益的、详细的、有礼貌的回答。"
)

# Each template: format strings with "{content}" for the message text, "{eos}" / "{bos}" for
# the tokenizer's ids and the names in "tokens" for special tokens that must be single ids.
#   system / user: a whole turn (mask 0); separator: text before a user turn that follows an
#   assistant turn (mask 0); assistant_open: what starts an assistant turn, trained iff
#   train_open; assistant: the answer (mask 1) with "end", the token closing the turn.
#   default_system: used when the messages have no system message (an empty one means none).
#   bos: True prepends bos_id always; None follows the tokenizer's add_bos.
#   fallback_ids: ids for tokens the tokenizer does not name.
TEMPLATES = {
    # HuatuoGPT v1: the answer tag "<HuatuoGPT>：" is trained along with the answer.
    "huatuo": {
        "system": "{content}",
        "default_system": HUATUO_SYSTEM,
        "user": "<病人>：{content} ",
        "separator": "",
        "assistant_open": "<HuatuoGPT>：",
        "train_open": True,
        "assistant": "{content} ",
        "end": "{eos}",
        "tokens": [],
        "stop_strings": ["<病人>"],
        "bos": None,
    },
    # HuatuoGPT-II: no default system; a given system text is followed by "\n".
    "huatuo2": {
        "system": "{content}\n",
        "default_system": None,
        "user": "<问>：{content}\n",
        "separator": "\n",
        "assistant_open": "<答>：",
        "train_open": False,
        "assistant": "{content}",
        "end": "{eos}",
        "tokens": [],
        "stop_strings": ["<问>"],
        "bos": None,
    },
    # Qwen2 / 2.5 / 3: Qwen2's default system prompt when none is given; "\n" after
    # <|im_end|> is emitted before the next turn, not after the final answer.
    "chatml": {
        "system": "<|im_start|>system\n{content}<|im_end|>\n",
        "default_system": "You are a helpful assistant.",
        "user": "<|im_start|>user\n{content}<|im_end|>\n",
        "separator": "\n",
        "assistant_open": "<|im_start|>assistant\n",
        "train_open": False,
        "assistant": "{content}",
        "end": "<|im_end|>",
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "stop_strings": ["<|im_end|>", "<|im_start|>"],
        "bos": None,
    },
    "llama3": {
        "system": "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        "default_system": None,
        "user": "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        "separator": "",
        "assistant_open": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "train_open": False,
        "assistant": "{content}",
        "end": "<|eot_id|>",
        "tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "stop_strings": ["<|eot_id|>"],
        "bos": True,
    },
    # Baichuan2-Chat: user turns start with <reserved_106> (id 195), assistant turns with <reserved_107> (196).
    "baichuan2": {
        "system": "{content}",
        "default_system": None,
        "user": "<reserved_106>{content}",
        "separator": "",
        "assistant_open": "<reserved_107>",
        "train_open": False,
        "assistant": "{content}",
        "end": "{eos}",
        "tokens": ["<reserved_106>", "<reserved_107>"],
        "fallback_ids": {"<reserved_106>": 195, "<reserved_107>": 196},
        "stop_strings": [],
        "bos": None,
    },
    # For tiny tokenizers without any special tokens beyond bos/eos.
    "plain": {
        "system": "{content}\n\n",
        "default_system": None,
        "user": "User: {content}\n",
        "separator": "\n",
        "assistant_open": "Assistant:\n",
        "train_open": False,
        "assistant": "{content}",
        "end": "{eos}",
        "tokens": [],
        "stop_strings": ["\nUser:"],
        "bos": None,
    },
}


def _template(name: str) -> dict:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose 'auto' (the model's own), a .jinja file or one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@lru_cache(maxsize=64)
def _auto(path: str) -> ChatTemplate:
    return resolve_template(path, "auto")


def _as_template(template, tok: Tokenizer | None = None) -> ChatTemplate:
    """A ChatTemplate from what callers pass: the object itself, a TEMPLATES name, or "auto" (tok's directory)."""
    if isinstance(template, ChatTemplate):
        return template
    if template in (None, "", "auto"):
        if tok is None:
            raise ValueError("template 'auto' means the model directory's own; pass resolve_template(model_dir) instead of the name")
        return _auto(str(tok.path))
    _template(template)
    return ChatTemplate(template)


# --- which template a command uses ----------------------------------------------------------


def resolve_template(model_dir: str | Path, name: str | None = "auto", tok: Tokenizer | None = None) -> ChatTemplate:
    """The chat template a command uses for `model_dir` (see the module docstring).

    name: "auto" (the model's own template, else a named fallback with a printed line), a
    TEMPLATES name, a path to a .jinja file, or the name of one of the model's named templates.
    tok: when given, a probe conversation is rendered with it, so a broken template or a
    missing token fails here rather than mid-run.
    """
    model_dir = Path(model_dir)
    found = find_chat_templates(model_dir) if model_dir.is_dir() else {}
    specials = tuple(sorted((tok.special_tokens if tok is not None else special_tokens(model_dir) if model_dir.is_dir() else {}).items()))
    if name in (None, "", "auto"):
        if "default" in found:
            source, origin = found["default"]
            template = ChatTemplate("auto", source, origin, specials)
        elif found:
            raise ValueError(
                f"{model_dir}: the model has chat templates {sorted(found)} but none named 'default'; pass --template NAME with one of them"
            )
        else:
            fallback = guess_template(model_dir)
            print(
                f"template: {model_dir} has no chat template (chat_template.jinja or tokenizer_config.json); "
                f"using the built-in {'HuatuoGPT ' if fallback.startswith('huatuo') else ''}template {fallback!r} (--template picks another)",
                flush=True,
            )
            template = ChatTemplate(fallback)
    elif name in TEMPLATES:
        template = ChatTemplate(name)
    elif name.endswith(".jinja") and Path(name).is_file():
        template = ChatTemplate(name, Path(name).read_text(encoding="utf-8"), name, specials)
    elif name in found:
        source, origin = found[name]
        template = ChatTemplate(name, source, origin, specials)
    else:
        own = f", or one of the model's own: {sorted(found)}" if found else ""
        raise ValueError(f"unknown chat template {name!r}; choose 'auto' (the model's own), a .jinja file, one of {sorted(TEMPLATES)}{own}")
    if tok is not None:
        render_prompt([{"role": "user", "content": "Hello"}], tok, template)
    return template


# --- the API --------------------------------------------------------------------------------
# Each public function checks its input, then hands the job to the template's kind (NAMED or
# JINJA below), which ChatTemplate decided once, when it was made.


def default_system(template) -> str | None:
    """The system text a named template uses when the conversation has none (None for Jinja templates)."""
    template = _as_template(template)
    return _KINDS[template.kind].default_system(template)


def stop_strings(template) -> list[str]:
    """Text that ends a generated answer when the model writes it out instead of the end token.

    For a Jinja template: its end-of-turn text and what opens the next user turn ("[INST]").
    """
    template = _as_template(template)
    return _KINDS[template.kind].stop_strings(template)


def stop_token_ids(tok: Tokenizer, template) -> set[int]:
    """The tokenizer's stop ids plus the token the template closes an assistant turn with."""
    template = _as_template(template, tok)
    return _KINDS[template.kind].stop_token_ids(tok, template)


def _token_id(name: str, tok: Tokenizer, template: str) -> int:
    tpl = _template(template)
    if name == "{eos}":
        return tok.eos_id
    if name == "{bos}":
        if tok.bos_id is None:
            raise ValueError(f"template {template!r} needs a bos token, which the tokenizer at {tok.path} lacks")
        return tok.bos_id
    token_id = tok.token_to_id(name)
    if token_id is None:
        token_id = tpl.get("fallback_ids", {}).get(name)
    if token_id is None or token_id >= tok.vocab_size:
        raise ValueError(
            f"template {template!r} needs the token {name!r}, which the tokenizer at {tok.path} lacks; "
            f"pick another template (see guess_template)"
        )
    return token_id


def _check(messages: list[dict], last: str, order: bool = True) -> None:
    """Raise ValueError naming the first message that is not {role, str content} or, with `order`,
    that breaks system? (user assistant)* order, or the last if its role is not `last`."""
    if not messages:
        raise ValueError("messages: empty conversation; pass at least one user message")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}]: need a dict with a str 'content', got {message!r}")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]: unknown role {role!r}; use 'system', 'user' or 'assistant'")
        if not order:
            continue
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}]: a system message may only come first")
            continue
        if role != expected:
            raise ValueError(f"messages[{i}]: expected {'a user' if expected == 'user' else 'an assistant'} turn, got "
                             f"{role!r}; turns must alternate user/assistant starting with user")
        expected = "assistant" if role == "user" else "user"
    if order and messages[-1]["role"] != last:
        what = ("a conversation to learn from ends with an assistant message" if last == "assistant" else
                "a prompt ends with the user message the model is to answer")
        raise ValueError(f"messages[{len(messages) - 1}]: conversation ends with {messages[-1]['role']!r}; {what}")


def _named_parts(messages: list[dict], template: str, prompt: bool) -> list[tuple[str, str, int]]:
    """(format, content, mask) per segment of a named template; prompt=True ends with the assistant opener."""
    tpl = _template(template)
    parts = []
    turns = messages
    system = tpl["default_system"]
    if messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    if system:
        parts.append((tpl["system"], system, 0))
    previous = None
    for message in turns:
        if message["role"] == "user":
            if previous == "assistant" and tpl["separator"]:
                parts.append((tpl["separator"], "", 0))
            parts.append((tpl["user"], message["content"], 0))
        else:
            parts.append((tpl["assistant_open"], "", int(tpl["train_open"])))
            parts.append((tpl["assistant"] + tpl["end"], message["content"], 1))
        previous = message["role"]
    if prompt:
        parts.append((tpl["assistant_open"], "", int(tpl["train_open"])))
    return parts


def _uses_bos(tpl: dict, tok: Tokenizer) -> bool:
    return bool((tpl["bos"] or (tpl["bos"] is None and tok.add_bos)) and tok.bos_id is not None)


def _segments(messages: list[dict], tok: Tokenizer, template: str, prompt: bool) -> list[tuple[list[int], int]]:
    """(ids, mask) per segment of a named template."""
    tpl = _template(template)
    names = ["{eos}", "{bos}", *tpl["tokens"]]
    splitter = re.compile("(" + "|".join(map(re.escape, names)) + ")")
    state = {"first": True}  # whether no text or template token has been emitted yet

    def encode(fmt: str, content: str = "") -> list[int]:
        ids = []
        for i, part in enumerate(splitter.split(fmt)):
            if i % 2:
                ids.append(_token_id(part, tok, template))
            elif part:
                ids += tok.encode(part.replace("{content}", content), continuation=not state["first"])
            else:
                continue
            state["first"] = False
        return ids

    segments = [([tok.bos_id], 0)] if _uses_bos(tpl, tok) else []
    for fmt, content, value in _named_parts(messages, template, prompt):
        segments.append((encode(fmt, content), value))
    return segments


def render(messages: list[dict], tok: Tokenizer, template) -> tuple[list[int], list[int]]:
    """Token ids of a conversation ending in an assistant turn, and its loss mask (1 = learn this token).

    template: what resolve_template returned, a TEMPLATES name, or "auto" (the tokenizer's directory).
    """
    template = _as_template(template, tok)
    _check(messages, "assistant")
    return _KINDS[template.kind].render(messages, tok, template)


def render_turns(messages: list[dict], tok: Tokenizer, template) -> list[tuple[list[int], list[int]]]:
    """Training sequences that teach every assistant turn in the form the model generates it.

    The first is `render(...)`. A template that rewrites earlier turns (Qwen3) masks those
    turns there; each of them gets one more sequence: the conversation through that turn,
    only that turn learned. Prefix-stable templates give a single sequence.
    """
    template = _as_template(template, tok)
    _check(messages, "assistant")
    return _KINDS[template.kind].render_turns(messages, tok, template)


def render_prompt(messages: list[dict], tok: Tokenizer, template, variables: dict | None = None) -> list[int]:
    """Token ids to generate the next assistant turn from: the conversation plus the assistant opener.

    variables: extra names a Jinja template can read (a server's `chat_template_kwargs`, such as
    Qwen3's `enable_thinking`); the named templates read none."""
    template = _as_template(template, tok)
    # a model's own template says itself which orders of roles it takes (Llama-2's raises where they do
    # not alternate; Qwen's renders any), as transformers and vLLM leave it to the template
    _check(messages, "user", order=template.kind == "named")
    return _KINDS[template.kind].render_prompt(messages, tok, template, variables)


def render_text(messages: list[dict], tok: Tokenizer, template, add_generation_prompt: bool = False) -> str:
    """The conversation as the text the template writes (special tokens spelled out), before tokenizing."""
    template = _as_template(template, tok)
    _check(messages, "user" if add_generation_prompt else "assistant")
    return _KINDS[template.kind].render_text(messages, tok, template, add_generation_prompt)


class NamedKind:
    """How a named template (the TEMPLATES table, rendered segment by segment) does each job."""

    def default_system(self, template):
        return _template(template.name)["default_system"]

    def stop_strings(self, template):
        return list(_template(template.name)["stop_strings"])

    def stop_token_ids(self, tok, template):
        return tok.stop_ids | {_token_id(_template(template.name)["end"], tok, template.name)}

    def render(self, messages, tok, template):
        ids, mask = [], []
        for segment, value in _segments(messages, tok, template.name, prompt=False):
            ids += segment
            mask += [value] * len(segment)
        return ids, mask

    def render_turns(self, messages, tok, template):
        return [self.render(messages, tok, template)]  # a named template never rewrites an earlier turn

    def render_prompt(self, messages, tok, template, variables):
        return [i for segment, _ in _segments(messages, tok, template.name, prompt=True) for i in segment]

    def render_text(self, messages, tok, template, add_generation_prompt):
        tpl = _template(template.name)
        spell = _named_spelling(template.name, tok)
        text = spell["{bos}"] if _uses_bos(tpl, tok) else ""
        for fmt, content, _ in _named_parts(messages, template.name, add_generation_prompt):
            text += _spelled(fmt, spell).replace("{content}", content)
        return text

    def jinja_source(self, tok, template):
        return named_jinja(template.name, tok)


class JinjaKind:
    """How a Jinja template (the model's own, rendered as transformers renders it) does each job."""

    def default_system(self, template):
        return None

    def stop_strings(self, template):
        markers = turn_markers(template)
        return list(dict.fromkeys(s for s in (markers.end, markers.user_open) if s))

    def stop_token_ids(self, tok, template):
        end = turn_markers(template, tok).end
        ids = tok.encode(end, continuation=True) if end else []
        return tok.stop_ids | (set(ids) if len(ids) == 1 else set())

    def render(self, messages, tok, template):
        text, spans, _ = learned_spans(messages, tok, template)
        return masked_ids(tok, text, spans)

    def render_turns(self, messages, tok, template):
        text, spans, rewritten = learned_spans(messages, tok, template)
        return [masked_ids(tok, text, spans)] + [masked_ids(tok, through, [span]) for _, through, span in rewritten]

    def render_prompt(self, messages, tok, template, variables):
        return tok.encode(render_jinja_text(messages, tok, template, True, variables))

    def render_text(self, messages, tok, template, add_generation_prompt):
        return render_jinja_text(messages, tok, template, add_generation_prompt)

    def jinja_source(self, tok, template):
        return template.source


_KINDS = {"named": NamedKind(), "jinja": JinjaKind()}


# --- a prompt that fits the context ----------------------------------------------------------


class PromptTooLong(ValueError):
    """The system message and the last question alone are longer than the prompt budget.

    `ids` is that shortest prompt and `budget` the room it had: a caller that would rather cut
    the question than refuse it keeps `ids[-budget:]` (evaluation does, and counts it).
    """

    def __init__(self, message: str, ids: list[int], budget: int):
        super().__init__(message)
        self.ids, self.budget = ids, budget


def prompt_budget(max_seq_len: int, context: int, max_new_tokens: int) -> int:
    """Prompt tokens left once the answer has its max_new_tokens in a context capped at max_seq_len."""
    context = min(context, max_seq_len)
    budget = context - max_new_tokens
    if max_new_tokens < 1 or budget < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in a {context}-token "
                         f"context (the model's max_seq_len is {max_seq_len}); lower --max-new-tokens"
                         + (" or raise --max-len" if context < max_seq_len else ""))
    return budget


def fit_prompt(messages: list[dict], tok: Tokenizer, template, budget: int) -> list[int]:
    """Prompt ids (as render_prompt) of a conversation ending on a question, at most `budget` of them.

    Whole earlier turns are dropped, oldest first (a question with its answer), until the prompt
    fits; the system message and the last question are always kept and never cut. When they alone
    are longer than `budget`, PromptTooLong says by how much (chat refuses the question, sampling
    skips the prompt, evaluation keeps the tail).
    """
    system = [m for m in messages[:1] if isinstance(m, dict) and m.get("role") == "system"]
    turns = messages[len(system):]
    ids = render_prompt(system + turns, tok, template)
    while len(ids) > budget and len(turns) > 1:
        turns = turns[2:]  # one question and its answer
        ids = render_prompt(system + turns, tok, template)
    if len(ids) > budget:
        raise PromptTooLong(f"the question{' with the system message' if system else ''} is {len(ids)} tokens, "
                            f"but only {budget} of the context are left for the prompt once the answer has its "
                            f"--max-new-tokens; shorten it, lower --max-new-tokens or raise --max-len", ids, budget)
    return ids


# --- where a model's tokenizer and chat template come from -----------------------------------


def tokenizer_and_template(model_dir: str | Path, adapter: str | Path | None = None,
                           name: str | None = "auto") -> tuple[Tokenizer, ChatTemplate]:
    """(tokenizer, chat template) of a model directory, or of a model with a LoRA adapter on it.

    A trained adapter directory carries the tokenizer and the chat template it was trained with
    (`save_chat_template` writes them next to the adapter), and those win over the base model's:
    the tokenizer comes from the adapter when it holds tokenizer.json or tokenizer.model, the
    template (`resolve_template(dir, name)`) from the first of adapter and model directory that
    has one; with neither, the fallback is guessed from the model directory.
    """
    own = adapter is not None and any((Path(adapter) / f).is_file() for f in TOKENIZER_MODEL_FILES)
    tok = Tokenizer.from_pretrained(adapter if own else model_dir)
    return tok, resolve_template(template_dir(model_dir, adapter), name, tok)


def _named_spelling(template: str, tok: Tokenizer) -> dict[str, str]:
    """How a named template's tokens are written as text for this tokenizer ({eos} -> "</s>", ...)."""
    tpl = _template(template)
    spell = {}
    for name in ["{eos}", "{bos}", *tpl["tokens"]]:
        if name == "{bos}" and tok.bos_id is None:
            continue
        token_id = _token_id(name, tok, template)
        spell[name] = name if tok.token_to_id(name) == token_id else tok.id_to_token(token_id)
    return spell


def _spelled(fmt: str, spell: dict[str, str]) -> str:
    for name, text in spell.items():
        fmt = fmt.replace(name, text)
    return fmt


def named_jinja(template: str, tok: Tokenizer) -> str:
    """A Jinja chat template that writes exactly what the named template writes for this tokenizer."""
    tpl = _template(template)
    spell = _named_spelling(template, tok)

    def around(fmt: str) -> tuple[str, str]:
        before, _, after = _spelled(fmt, spell).partition("{content}")
        return json.dumps(before, ensure_ascii=False), json.dumps(after, ensure_ascii=False)

    system_before, system_after = around(tpl["system"])
    user_before, user_after = around(tpl["user"])
    answer_before, answer_after = around(tpl["assistant"] + tpl["end"])
    opener = json.dumps(_spelled(tpl["assistant_open"], spell), ensure_ascii=False)
    separator = json.dumps(_spelled(tpl["separator"], spell), ensure_ascii=False)
    bos = json.dumps(spell["{bos}"] if _uses_bos(tpl, tok) else "", ensure_ascii=False)
    lines = [
        f"{{#- nanohuatuo's {template!r} template; rendering matches nanohuatuo.templates.render -#}}",
        f"{{%- set ns = namespace(system={json.dumps(tpl['default_system'] or '', ensure_ascii=False)}, previous='') -%}}",
        "{%- set turns = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set ns.system = messages[0]['content'] -%}",
        "{%- set turns = messages[1:] -%}",
        "{%- endif -%}",
        f"{{{{- {bos} -}}}}",
        f"{{%- if ns.system -%}}{{{{- {system_before} + ns.system + {system_after} -}}}}{{%- endif -%}}",
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        f"{{%- if ns.previous == 'assistant' -%}}{{{{- {separator} -}}}}{{%- endif -%}}",
        f"{{{{- {user_before} + message['content'] + {user_after} -}}}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{{{- {opener} + {answer_before} + message['content'] + {answer_after} -}}}}",
        "{%- else -%}",
        "{{- raise_exception('this template takes system, user and assistant messages, not ' + message['role']) -}}",
        "{%- endif -%}",
        "{%- set ns.previous = message['role'] -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {opener} -}}}}{{%- endif -%}}",
    ]
    return "\n".join(lines) + "\n"


def save_chat_template(out_dir: str | Path, tok: Tokenizer, template) -> None:
    """Make `out_dir` render the trained format: its tokenizer files carry `template`.

    Copies the tokenizer files when `out_dir` has none, then writes the Jinja text (for a named
    template, `named_jinja`) as chat_template.jinja and as `chat_template` in
    tokenizer_config.json, so transformers (which reads the .jinja first), vLLM and older
    readers of the config all render what the model was trained on.
    """
    template = _as_template(template, tok)
    write_chat_template(out_dir, tok, _KINDS[template.kind].jinja_source(tok, template))


def generation_defaults(model_dir: str | Path, adapter: str | Path | None = None) -> dict:
    """Sampling defaults of a model directory's generation_config.json, named as SamplingParams names them.

    Keys present only when the file sets them: temperature, top_p, top_k, repetition_penalty,
    stop_ids (the eos_token_id list). `do_sample: false` means greedy: temperature 0.0 and
    no top_p / top_k. {} when there is no generation_config.json. With an adapter, its own
    generation_config.json wins when it has one (a trained model may ship its sampling values).
    """
    config = (adapter and read_json(Path(adapter) / "generation_config.json", optional=True)) or \
        read_json(Path(model_dir) / "generation_config.json", optional=True)
    out = {}
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float)):
        if config.get(key) is not None:
            out[key] = kind(config[key])
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
        out.pop("top_p", None)
        out.pop("top_k", None)
    eos = config.get("eos_token_id")
    if eos is not None:
        out["stop_ids"] = [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    return out


def show(ids: list[int], mask: list[int], tok: Tokenizer, color: bool | None = None) -> str:
    """The conversation as text with trained (mask 1) spans in [[...]], or green on a terminal."""
    if len(ids) != len(mask):
        raise ValueError(f"show: {len(ids)} ids but {len(mask)} mask values; pass the pair render returned")
    color = sys.stdout.isatty() if color is None else color
    opening, closing = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    stream = StreamDecoder(tok, skip_special=False)
    runs: list[list] = []  # [mask value, text]; a character split over tokens goes to the token completing it
    for token_id, value in zip(ids, mask):
        text = stream.put(token_id)
        if runs and runs[-1][0] == value:
            runs[-1][1] += text
        else:
            runs.append([value, text])
    if runs:
        runs[-1][1] += stream.flush()
    return "".join(f"{opening}{text}{closing}" if value else text for value, text in runs)


def _name_template(name: str) -> str | None:
    name = name.lower()
    if "huatuo" not in name:
        return None
    return "huatuo2" if re.search(r"huatuo(gpt)?[-_ ]?(ii|2)", name) else "huatuo"


def guess_template(model_dir: str | Path) -> str:
    """Pick a template for a model directory.

    In order: the chat template text in tokenizer_config.json / chat_template.jinja;
    "huatuo" in the directory name or config `_name_or_path` (HuatuoGPT-II -> huatuo2);
    Baichuan's user_token_id 195, model_type / architectures in config.json; else "huatuo".
    """
    model_dir = Path(model_dir)

    tokenizer_config = read_json(model_dir / "tokenizer_config.json", optional=True)
    config = read_json(model_dir / "config.json", optional=True)
    generation = read_json(model_dir / "generation_config.json", optional=True)
    chat = tokenizer_config.get("chat_template") or ""
    if isinstance(chat, list):  # named templates: [{"name": ..., "template": ...}]
        chat = " ".join(str(t.get("template", "")) for t in chat)
    if (model_dir / "chat_template.jinja").exists():
        chat += (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    for marker, template in (
        ("<|im_start|>", "chatml"),
        ("<|start_header_id|>", "llama3"),
        ("<reserved_106>", "baichuan2"),
        ("<问>", "huatuo2"),
        ("<病人>", "huatuo"),
    ):
        if marker in chat:
            return template

    for name in (model_dir.resolve().name, str(config.get("_name_or_path", ""))):
        if _name_template(name):
            return _name_template(name)

    model_type = str(config.get("model_type", "")).lower()
    architectures = " ".join(config.get("architectures") or []).lower()
    user_token_ids = (config.get("user_token_id"), generation.get("user_token_id"))
    if 195 in user_token_ids or "baichuan" in model_type + architectures:
        return "baichuan2"
    if model_type.startswith("qwen") or "qwen" in architectures:
        return "chatml"
    if model_type == "llama" and int(config.get("vocab_size", 0)) >= 128000:
        return "llama3"
    return "huatuo"
