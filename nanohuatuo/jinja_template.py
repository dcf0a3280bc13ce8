"""The Jinja side of chat templates: a model directory's own template, rendered as transformers renders it.

`ChatTemplate` is what `templates.resolve_template` returns: a named template (the TEMPLATES
table of templates.py) or Jinja text with the file it came from. This module holds the Jinja
half, in the order a conversation meets it:

* **Finding** a model's templates (`find_chat_templates`): `chat_template.jinja`,
  `additional_chat_templates/NAME.jinja`, or `chat_template` in tokenizer_config.json (a
  string or the named list `[{"name": "default", "template": ...}, ...]`), with transformers'
  precedence.
* **Rendering** (`render_jinja_text`) in jinja2's immutable sandbox with the environment
  transformers gives it (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`,
  `strftime_now`, transformers' `tojson`, `namespace`, the tokenizer's
  `bos_token`/`eos_token`/..., `add_generation_prompt`, `tools=None`, `documents=None`), plus
  the template's `options` (Qwen3's `enable_thinking`). Tokenizing the text as one string with
  special tokens recognised and none added gives the ids of `apply_chat_template(messages,
  tokenize=True)`.
* **Loss masks** (`learned_spans`, then `masked_ids`). Where the template marks
  `{% generation %}` blocks, the tokens overlapping them are learned (transformers'
  `return_assistant_tokens_mask`). Otherwise the mask is derived from the template itself by
  rendering growing prefixes of the conversation: for assistant turn k, the prompt P = the
  conversation before it rendered with the generation prompt, and F = the conversation through
  turn k; the answer is F minus P, and its learned part runs up to and including the template's
  end-of-turn text (`<|im_end|>`, `<|eot_id|>`, `</s>`: what follows the answer in the template,
  found by rendering a probe conversation, `turn_markers`), so the newline after `<|im_end|>`
  stays masked. Tokens overlapping the learned characters have mask 1, everything else 0. A
  template whose P is not the start of F (or of the whole conversation) is not prefix-stable and
  is refused with the turn and the first difference. A template that rewrites a turn once later
  turns follow (Qwen3 drops the reasoning of earlier answers) has a fixed rule: **a turn is
  learned only where its text in the whole conversation is what the template renders for it as
  the last turn**, i.e. what the model generates at inference; a rewritten turn stays in the
  sequence as context, masked, and is returned apart so it can get a sequence of its own.
* **Writing** a trained template into an output's tokenizer files (`write_chat_template`).
"""

import json
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from nanohuatuo.hf import atomic_write, read_json
from nanohuatuo.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatTemplate:
    """What `templates.resolve_template` returns: a named template, or Jinja text and where it came from.

    Plain strings only, so it pickles and compares by value (two copies of one template from
    different directories are equal); the compiled Jinja lives in a cache.
    `kind` is decided here, once: "jinja" when there is Jinja text, else "named" (a TEMPLATES
    entry); templates.py does each job through the one implementation of that kind.
    `spec` is what `resolve_template(model_dir, spec)` turns back into this template.
    """

    name: str  # a TEMPLATES key, "auto" (the model's default), a named Jinja template, or a .jinja path
    source: str | None = None  # the Jinja text; None for a named template
    origin: str = field(default="", compare=False)  # the file the Jinja text was read from, for messages
    special_tokens: tuple[tuple[str, str], ...] = ()  # bos_token, eos_token, ... of the model directory
    options: tuple[tuple[str, object], ...] = ()  # extra template variables, e.g. (("enable_thinking", False),)
    kind: str = field(init=False, compare=False, repr=False)  # "jinja" | "named", from source

    def __post_init__(self):
        object.__setattr__(self, "kind", "named" if self.source is None else "jinja")  # frozen: set once here

    @property
    def is_jinja(self) -> bool:
        return self.kind == "jinja"

    @property
    def spec(self) -> str:
        return self.name

    def __str__(self) -> str:
        return f"{self.name} ({self.origin})" if self.is_jinja else self.name


# --- where a model directory keeps its chat template -----------------------------------------


def find_chat_templates(model_dir: str | Path) -> dict[str, tuple[str, str]]:
    """{name: (jinja text, file)} of a model directory, with transformers' precedence.

    chat_template.jinja ("default") and additional_chat_templates/*.jinja replace what
    tokenizer_config.json's `chat_template` holds (a string, "default", or the named list);
    a processor's chat_template.json is read last.
    """
    model_dir = Path(model_dir)
    found = {}
    if (model_dir / "chat_template.jinja").is_file():
        found["default"] = ((model_dir / "chat_template.jinja").read_text(encoding="utf-8"), str(model_dir / "chat_template.jinja"))
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            found[file.name.removesuffix(".jinja")] = (file.read_text(encoding="utf-8"), str(file))
    if found:
        return found
    for file in ("tokenizer_config.json", "chat_template.json"):
        value = read_json(model_dir / file, optional=True).get("chat_template")
        origin = str(model_dir / file)
        if isinstance(value, str) and value:
            return {"default": (value, origin)}
        if isinstance(value, list):
            named = {}
            for i, entry in enumerate(value):
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("template"), str):
                    raise ValueError(f"{origin}: chat_template[{i}] must be {{\"name\": str, \"template\": str}}, got {entry!r}")
                named[entry["name"]] = (entry["template"], origin)
            if named:
                return named
    return {}


def template_dir(model_dir: str | Path, adapter: str | Path | None = None) -> str | Path:
    """Where a model with a LoRA adapter finds its chat template: the adapter's directory when it carries
    one (the template it was trained with, written beside it), else the model's."""
    return adapter if adapter is not None and find_chat_templates(adapter) else model_dir


# --- the Jinja environment transformers renders chat templates in ---------------------------

_tracking: ContextVar = ContextVar("generation_tracking", default=None)  # (rendered blocks, spans) while tracked


@lru_cache(maxsize=1)
def _environment():
    """jinja2's immutable sandbox set up as transformers' `_compile_jinja_template` sets it up."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:
        raise ImportError("chat templates from a model directory need jinja2: pip install 'jinja2>=3.1'") from e

    class Generation(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %}: the assistant text a template marks as learned
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping, non-ASCII kept, its options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        # dict() without attribute access to the type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespace() that refuses underscore names, as transformers' does
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                TemplateNamespace.check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            TemplateNamespace.check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace, got {key!r}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile(source: str, origin: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {origin}, line {e.lineno}: {e.message}; fix the template or pass --template NAME") from e


def _plain(value):
    # what the template sees is rebuilt from plain JSON types, as transformers does
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: None values dropped, reasoning aliased."""
    out = []
    for message in messages:
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _render_jinja(template: ChatTemplate, messages: list[dict], specials: dict, add_generation_prompt: bool,
                  now: datetime | None = None, track: bool = False,
                  variables: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of {% generation %} blocks) of `messages` under a Jinja template;
    `variables` are extra names the template can read (they cannot replace the ones set here)."""
    import jinja2

    compiled = _compile(template.source, template.origin)
    now = now or datetime.now()
    context = {
        **specials,
        **dict(template.options),
        # one clock per render, so the prefixes of one conversation all carry the same date
        "strftime_now": lambda fmt: now.strftime(fmt),
    }
    kwargs = dict(messages=_template_messages(messages), tools=None, documents=None, add_generation_prompt=add_generation_prompt)
    context = {**(variables or {}), **context}
    blocks, spans = [], []
    token = _tracking.set((blocks, spans)) if track else None
    try:
        for block in compiled.generate(**kwargs, **context):
            blocks.append(block)
    except (jinja2.TemplateError, TypeError) as e:
        raise ValueError(f"chat template {template.origin}: {e}") from e
    finally:
        if token is not None:
            _tracking.reset(token)
    return "".join(blocks), spans


# --- what the template writes around turns, and the characters a mask learns ----------------

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TurnMarkers:
    """The text a Jinja template writes around turns, read off a probe conversation."""

    end: str  # text that closes an assistant turn ("<|im_end|>"), "" if none
    user_open: str  # text that opens a user turn after an answer ("<|im_start|>user"), "" if unknown


@lru_cache(maxsize=64)
def _probe(template: ChatTemplate, specials: tuple) -> TurnMarkers:
    """What the template writes after an answer and before a user turn, read off a probe conversation."""
    specials = dict(specials)
    q1, a1, q2 = ({"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"})
    try:
        prompt = _render_jinja(template, [q1], specials, True)[0]
        through = _render_jinja(template, [q1, a1], specials, False)[0]
        more = _render_jinja(template, [q1, a1, q2], specials, False)[0]
    except ValueError:
        return TurnMarkers("", "")
    answer = through[len(prompt) :] if through.startswith(prompt) else through
    at = answer.rfind("A1")
    end = answer[at + 2 :].strip() if at >= 0 else ""
    user_open = ""
    if more.startswith(through) and "Q2" in more[len(through) :]:
        user_open = more[len(through) :].split("Q2")[0].strip()
        for token in (specials.get("eos_token"), specials.get("bos_token")):
            if token and user_open.startswith(token):  # "<s>[INST]": the text part is what a model writes out
                user_open = user_open[len(token) :].strip()
    return TurnMarkers(end, user_open)


def turn_markers(template: ChatTemplate, tok: Tokenizer | None = None) -> TurnMarkers:
    """What closes an answer and opens the next user turn under `template` (with tok's special tokens, if given)."""
    return _probe(template, tuple(sorted(_specials(template, tok).items())))


def render_jinja_text(messages: list[dict], tok: Tokenizer | None, template: ChatTemplate, add_generation_prompt: bool,
                      variables: dict | None = None) -> str:
    """The text a Jinja template writes for `messages` (special tokens spelled out), before tokenizing."""
    return _render_jinja(template, messages, _specials(template, tok), add_generation_prompt,
                         variables=variables)[0]


def _specials(template: ChatTemplate, tok: Tokenizer | None) -> dict:
    # the tokenizer's special tokens, as transformers passes them; the template's own when there is no tokenizer
    return dict(tok.special_tokens) if tok is not None else dict(template.special_tokens)


def _difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"they differ at character {i}: {a[i : i + 40]!r} vs {b[i : i + 40]!r}"


def learned_spans(messages: list[dict], tok: Tokenizer, template: ChatTemplate) -> tuple[str, list, list]:
    """(text of the whole conversation, learned character spans, rewritten turns as [(k, text through k, span)])."""
    specials = _specials(template, tok)
    now = datetime.now()
    if _GENERATION_TAG.search(template.source):
        text, spans = _render_jinja(template, messages, specials, False, now, track=True)
        return text, spans, []
    text = _render_jinja(template, messages, specials, False, now)[0]
    end = _probe(template, tuple(sorted(specials.items()))).end
    spans, rewritten = [], []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_jinja(template, messages[:k], specials, True, now)[0]
        through = text if k == len(messages) - 1 else _render_jinja(template, messages[: k + 1], specials, False, now)[0]
        for whole, what in ((through, f"the conversation through messages[{k}]"), (text, "the whole conversation")):
            if not whole.startswith(prompt):
                raise ValueError(
                    f"chat template {template.origin} is not prefix-stable: the prompt for messages[{k}] (the turns before it "
                    f"with the generation prompt) is not the start of {what}; {_difference(prompt, whole)}. Loss masks cannot be "
                    f"derived from it: mark the answers with {{% generation %}} blocks or pass --template NAME"
                )
        answer = through[len(prompt) :]
        cut = answer.rfind(end) if end else -1
        learned = answer[: cut + len(end)] if cut >= 0 else answer
        span = (len(prompt), len(prompt) + len(learned))
        if text.startswith(learned, len(prompt)):
            spans.append(span)
        else:  # rewritten once later turns follow (Qwen3 drops earlier reasoning): context, not target
            rewritten.append((k, through, span))
    return text, spans, rewritten


def masked_ids(tok: Tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """ids of `text` and 1 for each token overlapping a span (transformers' assistant-mask rule)."""
    ids, offsets = tok.encode_offsets(text)
    mask = []
    for start, stop in offsets:
        mask.append(int(any(start < b and stop > a for a, b in spans)))
    return ids, mask


# --- writing a trained template into an output directory ------------------------------------


def _write_text(path: Path, text: str) -> None:
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_chat_template(out_dir: str | Path, tok: Tokenizer, source: str) -> None:
    """Make `out_dir`'s tokenizer files carry the Jinja text `source`.

    Copies the tokenizer files when `out_dir` has none, then writes `source` as
    chat_template.jinja and as `chat_template` in tokenizer_config.json, so transformers (which
    reads the .jinja first), vLLM and older readers of the config all render the same template.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any((out_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        tok.save_pretrained(out_dir)
    _write_text(out_dir / "chat_template.jinja", source)
    config = read_json(out_dir / "tokenizer_config.json", optional=True)
    config["chat_template"] = source
    _write_text(out_dir / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")
