"""Chat templates: a conversation -> token ids plus the loss mask of the tokens the model must learn.

Templates are plain data (the TEMPLATES dict). A conversation is a list of
`{"role": "system"|"user"|"assistant", "content": str}`: an optional system message
first, then user and assistant turns alternating, starting with a user turn.

How ids are made, for training (`render`) and generation (`render_prompt`) alike:
the conversation is cut into segments (bos, system, each user turn, the separator
between turns, the assistant opener, the assistant answer with its end-of-turn token);
each segment is tokenized on its own and the ids are concatenated, so a mask covers
whole segments exactly and a prompt is always a prefix of the training sequence.
Inside a segment, the template's special tokens (`<|im_start|>`, `{eos}`, ...) become
their ids directly and the text between them is encoded with `Tokenizer.encode`; only
the first text of the sequence gets a sentencepiece prefix space (transformers'
non-legacy Llama behaviour), the rest is encoded with `continuation=True`. Message
contents are used verbatim (no stripping).
"""

import json
import re
import sys
from pathlib import Path

from nanohuatuo.tokenizer import StreamDecoder, Tokenizer

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
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def default_system(template: str) -> str | None:
    return _template(template)["default_system"]


def stop_strings(template: str) -> list[str]:
    """Text that ends a generated answer when the model writes it out instead of the end token."""
    return list(_template(template)["stop_strings"])


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


def stop_token_ids(tok: Tokenizer, template: str) -> set[int]:
    """The tokenizer's stop ids plus the token this template closes an assistant turn with."""
    return tok.stop_ids | {_token_id(_template(template)["end"], tok, template)}


def _check(messages: list[dict], last: str) -> None:
    """Raise ValueError naming the first message that breaks system? (user assistant)* order."""
    if not messages:
        raise ValueError("messages: empty conversation; pass at least one user message")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}]: need a dict with a str 'content', got {message!r}")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]: unknown role {role!r}; use 'system', 'user' or 'assistant'")
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}]: a system message may only come first")
            continue
        if role != expected:
            raise ValueError(f"messages[{i}]: expected a {expected} turn, got {role!r}; turns must alternate user/assistant starting with user")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != last:
        what = "render needs a final assistant turn" if last == "assistant" else "render_prompt needs a final user turn"
        raise ValueError(f"messages[{len(messages) - 1}]: conversation ends with a {messages[-1]['role']} message; {what}")


def _segments(messages: list[dict], tok: Tokenizer, template: str, prompt: bool) -> list[tuple[list[int], int]]:
    """(ids, mask) per segment; with prompt=True the conversation ends with the assistant opener."""
    tpl = _template(template)
    _check(messages, "user" if prompt else "assistant")
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

    segments = []
    if tpl["bos"] or (tpl["bos"] is None and tok.add_bos):
        if tok.bos_id is not None:
            segments.append(([tok.bos_id], 0))
    turns = messages
    system = tpl["default_system"]
    if messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    if system:
        segments.append((encode(tpl["system"], system), 0))
    previous = None
    for message in turns:
        if message["role"] == "user":
            if previous == "assistant" and tpl["separator"]:
                segments.append((encode(tpl["separator"]), 0))
            segments.append((encode(tpl["user"], message["content"]), 0))
        else:
            segments.append((encode(tpl["assistant_open"]), int(tpl["train_open"])))
            segments.append((encode(tpl["assistant"] + tpl["end"], message["content"]), 1))
        previous = message["role"]
    if prompt:
        segments.append((encode(tpl["assistant_open"]), int(tpl["train_open"])))
    return segments


def render(messages: list[dict], tok: Tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation ending in an assistant turn, and its loss mask (1 = learn this token)."""
    ids, mask = [], []
    for segment, value in _segments(messages, tok, template, prompt=False):
        ids += segment
        mask += [value] * len(segment)
    return ids, mask


def render_prompt(messages: list[dict], tok: Tokenizer, template: str) -> list[int]:
    """Token ids to generate the next assistant turn from: the conversation plus the assistant opener."""
    return [i for segment, _ in _segments(messages, tok, template, prompt=True) for i in segment]


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

    def read(name: str) -> dict:
        path = model_dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    tokenizer_config = read("tokenizer_config.json")
    config, generation = read("config.json"), read("generation_config.json")
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
