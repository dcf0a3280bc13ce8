"""Tokenizer: one wrapper over a Hugging Face `tokenizer.json` or a sentencepiece `tokenizer.model`.

Holds `Tokenizer` (load from a model directory, encode / decode, special ids, save),
`StreamDecoder` (turn generated ids into text one token at a time without ever
emitting half a UTF-8 character) and `train_sentencepiece` (a small, deterministic
Llama-style BPE sentencepiece model for tests and demos).

Encoding rules, shared by both backends so chat templates can tokenize a conversation
segment by segment (see `nanohuatuo.templates`):

* `encode(text)` adds no special tokens (like transformers' `add_special_tokens=False`);
  `bos=True` prepends `bos_id`.
* Strings of added / special tokens inside the text (`<|im_start|>`, `</s>`, ...) map to
  their single ids, as transformers does.
* Sentencepiece models with a dummy prefix (Llama) get the `▁` prefix only on text that
  starts the sequence, and not when the text already starts with a space: this is
  transformers' non-legacy Llama tokenizer (`legacy=False`, `add_prefix_space=True`,
  Metaspace `prepend_scheme="first"`), which is also what `train_sentencepiece` writes
  into `tokenizer_config.json`. `continuation=True` encodes text that continues earlier
  text (no prefix at all), which is how transformers tokenizes text after a special token.
* `decode` does no clean-up of spaces (`clean_up_tokenization_spaces=False`), and drops the
  U+FFFD that byte pieces stopping mid-character decode to (a generation cut off inside a
  character, or bytes a small model strings together that form none): readers never see "�".
  `replacement=True` keeps them, as the underlying tokenizer returns them.
* `encode_offsets(text)` gives the ids of `encode(text)` with each token's character span,
  which is how chat templates map the assistant's text onto tokens.
"""

import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

from .hf import TOKENIZER_MODEL_FILES, atomic_write, read_json

# Files that make up a tokenizer; save_pretrained copies the ones that were present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# The named special tokens transformers hands a chat template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tried in order when no pad token is defined; eos is avoided because code that masks
# labels by `ids == pad_id` would then also drop the end-of-turn labels.
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def _content(token) -> str | None:
    # tokenizer_config.json writes special tokens either as "</s>" or {"content": "</s>", ...}
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """The named special tokens of a model directory as strings ({"eos_token": "</s>", ...}).

    tokenizer_config.json wins over special_tokens_map.json, even when it says null; this is
    the map transformers hands a chat template as `bos_token`, `eos_token`, ...
    """
    model_dir = Path(model_dir)
    config = read_json(model_dir / "tokenizer_config.json", optional=True)
    special_map = read_json(model_dir / "special_tokens_map.json", optional=True)
    found = {}
    for key in SPECIAL_TOKEN_NAMES:
        content = _content(config[key] if key in config else special_map.get(key))
        if content is not None:
            found[key] = content
    return found


def _id_list(value) -> list[int]:
    # generation_config / config eos_token_id may be an int, a list of ints or null
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# --- sentencepiece model proto, read and patched without the protobuf package ---------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _proto_fields(buf: bytes):
    """Yield (field number, wire type, raw bytes of the whole field, payload) of a protobuf message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = None
        if wire == 0:
            payload, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            payload, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"tokenizer.model: unknown protobuf wire type {wire}; the file is not a sentencepiece model")
        yield number, wire, buf[start:pos], payload


# ModelProto field 3 is NormalizerSpec; its field 3 is add_dummy_prefix (default true).
_NORMALIZER_SPEC, _ADD_DUMMY_PREFIX = 3, 3


def _spm_adds_dummy_prefix(proto: bytes) -> bool:
    for number, wire, _, payload in _proto_fields(proto):
        if number == _NORMALIZER_SPEC and wire == 2:
            for inner, inner_wire, _, value in _proto_fields(payload):
                if inner == _ADD_DUMMY_PREFIX and inner_wire == 0:
                    return bool(value)
    return True


def _spm_without_dummy_prefix(proto: bytes) -> bytes:
    """The same model proto with add_dummy_prefix=false (used for continuation text)."""
    flag_off = bytes([_ADD_DUMMY_PREFIX << 3, 0])
    out, patched = bytearray(), False
    for number, wire, raw, payload in _proto_fields(proto):
        if number == _NORMALIZER_SPEC and wire == 2:
            spec = b"".join(r for n, _, r, _ in _proto_fields(payload) if n != _ADD_DUMMY_PREFIX) + flag_off
            out += bytes([_NORMALIZER_SPEC << 3 | 2]) + _varint(len(spec)) + spec
            patched = True
        else:
            out += raw
    if not patched:
        out += bytes([_NORMALIZER_SPEC << 3 | 2]) + _varint(len(flag_off)) + flag_off
    return bytes(out)


# --- tokenizer.json without the prefix space, for continuation text -------------------------


def _strip_prefixing(node):
    """Copy of a tokenizer.json component with every "prepend a space / ▁" step turned off."""
    if isinstance(node, list):
        return [_strip_prefixing(n) for n in node if not _is_prefixing_step(n)]
    if not isinstance(node, dict):
        return node
    node = {k: _strip_prefixing(v) for k, v in node.items()}
    if node.get("type") == "Metaspace":
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
    if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
        node["add_prefix_space"] = False
    return node


def _is_prefixing_step(node) -> bool:
    # Llama-2 style normalizer Prepend("▁") and the decoder Strip(" ", left=1) that undoes it
    if not isinstance(node, dict):
        return False
    return node.get("type") == "Prepend" or (node.get("type") == "Strip" and node.get("start", 0) > 0)


class Tokenizer:
    """A model directory's tokenizer: `tokenizer.json` (preferred) or sentencepiece `tokenizer.model`.

    Attributes: `path`, `backend` ("tokenizers" or "sentencepiece"), `bos_id` (or None),
    `eos_id`, `stop_ids` (every id that ends a generation), `pad_id`, `vocab_size`,
    `add_bos` (whether the model family starts sequences with BOS), `files` (what was loaded),
    `special_tokens` (the named special tokens as strings, {"eos_token": "</s>", ...}: what
    transformers passes to a chat template).

    `pad_id` is the defined pad token when there is one; otherwise the first of
    PAD_CANDIDATES present, then unk, then bos, and eos only as the last resort, so that
    padding rarely collides with the end token the model must learn.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such model directory; pass a directory holding tokenizer.json or tokenizer.model")
        self.files = [name for name in TOKENIZER_FILES if (self.path / name).exists()]
        config = read_json(self.path / "tokenizer_config.json", optional=True)
        special_map = read_json(self.path / "special_tokens_map.json", optional=True)
        generation = read_json(self.path / "generation_config.json", optional=True)
        model_config = read_json(self.path / "config.json", optional=True)

        # Added tokens: id -> (content, special), from the config files and the tokenizer itself.
        self._added: dict[int, tuple[str, bool]] = {}
        for key, token in (config.get("added_tokens_decoder") or {}).items():
            special = token.get("special", True) if isinstance(token, dict) else True
            self._added[int(key)] = (_content(token), special)
        for content, token_id in read_json(self.path / "added_tokens.json", optional=True).items():
            self._added.setdefault(int(token_id), (content, True))

        if (self.path / "tokenizer.json").exists():
            self._load_tokenizers(self.path / "tokenizer.json")
        elif (self.path / "tokenizer.model").exists():
            self._load_sentencepiece(self.path / "tokenizer.model")
        else:
            raise FileNotFoundError(
                f"{self.path}: neither tokenizer.json nor tokenizer.model found; copy the base model's tokenizer files here"
            )

        def named(key: str) -> tuple[bool, int | None]:
            # (whether the tokenizer files name this token, its id); tokenizer_config wins, even when null
            for source in (config, special_map):
                if key in source:
                    content = _content(source[key])
                    return True, None if content is None else self.token_to_id(content)
            return False, None

        bos_named, bos_id = named("bos_token")
        if not bos_named:
            from_configs = _id_list(generation.get("bos_token_id")) + _id_list(model_config.get("bos_token_id"))
            bos_id = from_configs[0] if from_configs else self._native_bos()
        self.bos_id: int | None = bos_id

        generation_eos = _id_list(generation.get("eos_token_id"))
        config_eos = _id_list(model_config.get("eos_token_id"))
        _, eos_id = named("eos_token")
        candidates = [eos_id] + config_eos + generation_eos + [self._native_eos()]
        eos_id = next((i for i in candidates if i is not None), None)
        if eos_id is None:
            raise ValueError(
                f"{self.path}: no end-of-sequence token; set eos_token in tokenizer_config.json or eos_token_id in generation_config.json"
            )
        self.eos_id: int = eos_id
        self.stop_ids: set[int] = {eos_id, *generation_eos, *config_eos}

        self.vocab_size: int = self._native_vocab_size()
        _, pad_id = named("pad_token")
        if pad_id is None:
            from_configs = _id_list(generation.get("pad_token_id")) + _id_list(model_config.get("pad_token_id"))
            pad_id = from_configs[0] if from_configs else None
        if pad_id is None:
            names = [self.token_to_id(name) for name in PAD_CANDIDATES]
            _, unk_id = named("unk_token")
            choices = [i for i in names + [unk_id, self._native_unk(), self.bos_id] if i is not None]
            pad_id = next((i for i in choices if i not in self.stop_ids), eos_id)
        self.pad_id: int = pad_id

        if "add_bos_token" in config:
            self.add_bos: bool = bool(config["add_bos_token"]) and self.bos_id is not None
        else:
            self.add_bos = self._native_add_bos()

        self.special_tokens: dict[str, str] = special_tokens(self.path)

        # Named special tokens are split out of text and skipped by decode, as transformers does.
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _content(config.get(key, special_map.get(key)))
            token_id = None if content is None else self.token_to_id(content)
            if token_id is not None and token_id not in self._added:
                self._added[token_id] = (content, True)
        self._finish_added()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        return cls(path)

    # --- backends ---------------------------------------------------------------------------

    def _load_tokenizers(self, file: Path) -> None:
        import tokenizers

        self.backend = "tokenizers"
        text = file.read_text(encoding="utf-8")
        self._tk = tokenizers.Tokenizer.from_str(text)
        spec = json.loads(text)
        prefixing = ("normalizer", "pre_tokenizer", "decoder")
        cont = {k: (_strip_prefixing(v) if k in prefixing else v) for k, v in spec.items()}
        self._tk_cont = self._tk if cont == spec else tokenizers.Tokenizer.from_str(json.dumps(cont))
        for token_id, token in self._tk.get_added_tokens_decoder().items():
            self._added.setdefault(token_id, (token.content, token.special))

    def _load_sentencepiece(self, file: Path) -> None:
        import sentencepiece

        self.backend = "sentencepiece"
        proto = file.read_bytes()
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(proto)
        self._dummy_prefix = _spm_adds_dummy_prefix(proto)
        self._sp_cont = self._sp
        if self._dummy_prefix:
            self._sp_cont = sentencepiece.SentencePieceProcessor()
            self._sp_cont.LoadFromSerializedProto(_spm_without_dummy_prefix(proto))

    def _finish_added(self) -> None:
        self._special_ids = {i for i, (_, special) in self._added.items() if special}
        if self.backend == "sentencepiece":
            # Control pieces (<s>, </s>, <pad>) and unk are special too: decode skips them.
            size = self._sp.get_piece_size()
            self._special_ids |= {i for i in range(size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
            # Longest first so that "<|im_start|>" wins over a shorter token it contains.
            contents = sorted({c for c, _ in self._added.values() if c}, key=len, reverse=True)
            # highest id first so that the lowest id wins when two ids share a string
            self._added_ids = {c: i for i, (c, _) in sorted(self._added.items(), reverse=True) if c}
            self._split_re = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None

    def _native_bos(self) -> int | None:
        if self.backend == "sentencepiece":
            return self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        return None

    def _native_eos(self) -> int | None:
        if self.backend == "sentencepiece":
            return self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        return None

    def _native_unk(self) -> int | None:
        if self.backend == "sentencepiece":
            return self._sp.unk_id() if self._sp.unk_id() >= 0 else None
        unk = getattr(self._tk.model, "unk_token", None)
        return self._tk.token_to_id(unk) if unk else None

    def _native_vocab_size(self) -> int:
        if self.backend == "sentencepiece":
            return max([self._sp.get_piece_size()] + [i + 1 for i in self._added])
        return self._tk.get_vocab_size(with_added_tokens=True)

    def _native_add_bos(self) -> bool:
        if self.bos_id is None:
            return False
        if self.backend == "sentencepiece":
            return True  # the Llama tokenizer's default
        # tokenizer.json states it in its post-processor (Llama-3 adds <|begin_of_text|> there)
        return self._tk.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    # --- public API ---------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        if self.backend == "tokenizers":
            return self._tk.token_to_id(token)
        for token_id, (content, _) in self._added.items():
            if content == token:
                return token_id
        piece_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces, so check the round trip
        return piece_id if self._sp.id_to_piece(piece_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if self.backend == "tokenizers":
            return self._tk.id_to_token(token_id)
        if token_id in self._added:
            return self._added[token_id][0]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None

    def encode(self, text: str, bos: bool = False, *, continuation: bool = False) -> list[int]:
        """Token ids of `text`, no special tokens added unless `bos=True`.

        `continuation=True`: the text continues earlier text, so no prefix space is added.
        """
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if self.backend == "tokenizers":
            tk = self._tk_cont if continuation else self._tk
            return ids + tk.encode(text, add_special_tokens=False).ids
        chunks = self._split_re.split(text) if self._split_re else [text]
        at_start = not continuation
        for i, chunk in enumerate(chunks):
            if i % 2:  # odd chunks are the added-token strings the regex captured
                ids.append(self._added_ids[chunk])
            elif chunk:
                # transformers' Metaspace adds no ▁ to text that already starts with a space
                prefixed = at_start and self._dummy_prefix and not chunk.startswith(" ")
                ids += (self._sp if prefixed else self._sp_cont).encode(chunk)
            at_start = False
        return ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, per token, the (start, end) character span of `text` it covers.

        A character spelled with several byte pieces gives each of them the character's span.
        """
        if self.backend == "tokenizers":
            encoding = self._tk.encode(text, add_special_tokens=False)
            return list(encoding.ids), [tuple(o) for o in encoding.offsets]
        ids, offsets, start = [], [], 0
        chunks = self._split_re.split(text) if self._split_re else [text]
        for i, chunk in enumerate(chunks):
            if i % 2:
                ids.append(self._added_ids[chunk])
                offsets.append((start, start + len(chunk)))
            elif chunk:
                prefixed = i == 0 and self._dummy_prefix and not chunk.startswith(" ")
                pieces = (self._sp if prefixed else self._sp_cont).encode(chunk, return_type="proto").pieces
                # sentencepiece counts bytes of the chunk; byte pieces of one character are empty but the last
                char_at = [0] * (len(chunk.encode("utf-8")) + 1)
                position = 0
                for k, ch in enumerate(chunk):
                    for _ in range(len(ch.encode("utf-8"))):
                        char_at[position] = k
                        position += 1
                char_at[position] = len(chunk)
                spans = [[char_at[p.begin], char_at[p.end]] for p in pieces]
                for k in range(len(spans) - 2, -1, -1):
                    if spans[k][0] == spans[k][1]:
                        spans[k] = list(spans[k + 1])
                ids += [p.id for p in pieces]
                offsets += [(start + a, start + b) for a, b in spans]
            start += len(chunk)
        return ids, offsets

    def decode(self, ids, skip_special: bool = True, *, continuation: bool = False, replacement: bool = False) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special=False`.

        `continuation=True`: the ids continue earlier ids, so a leading space is kept.
        Bytes that form no complete character decode to nothing; `replacement=True` gives the
        tokenizer's U+FFFD for them instead (a U+FFFD in the text itself is dropped too unless set).
        """
        text = self._decode(ids, skip_special, continuation)
        return text if replacement else text.replace("\ufffd", "")

    def _decode(self, ids, skip_special: bool, continuation: bool) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "tokenizers":
            tk = self._tk_cont if continuation else self._tk
            return tk.decode(ids, skip_special_tokens=skip_special)
        size = self._sp.get_piece_size()
        parts, run = [], []
        for token_id in ids:
            if skip_special and token_id in self._special_ids:
                continue
            if token_id in self._added:
                parts.append(self._decode_run(run, continuation or bool(parts)))
                parts.append(self._added[token_id][0])
                run = []
            elif 0 <= token_id < size:
                run.append(token_id)
            else:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {self.path} ({self.vocab_size} ids)")
        parts.append(self._decode_run(run, continuation or bool(parts)))
        return "".join(parts)

    def _decode_run(self, run: list[int], continuation: bool) -> str:
        # The dummy-prefix model strips the leading ▁ only at the start of a sequence.
        if not run:
            return ""
        return (self._sp_cont if continuation else self._sp).decode(run)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Copy the tokenizer files this tokenizer was loaded from into `out_dir`.

        generation_config.json is copied too when `out_dir` has none, since stop ids come from it.
        Each file is copied under a temporary name and renamed, and tokenizer.json / tokenizer.model
        come last: a directory that has one of them has the rest (a run killed mid-copy leaves no
        half file, and its rerun, which copies only into a directory without them, completes the set).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(self.files, key=lambda name: name in TOKENIZER_MODEL_FILES)
        if (self.path / "generation_config.json").exists() and not (out_dir / "generation_config.json").exists():
            names.insert(0, "generation_config.json")
        for name in names:
            if (out_dir / name).resolve() != (self.path / name).resolve():
                atomic_write(out_dir / name, lambda tmp, name=name: shutil.copyfile(self.path / name, tmp))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={sorted(self.stop_ids)})"
        )


class StreamDecoder:
    """Turn ids into text one at a time; `put` returns only completed characters.

    It decodes a sliding window (the previous chunk plus the new tokens) and holds text
    back while it ends in U+FFFD, i.e. while a multi-byte character is still split over
    byte tokens; bytes that turn out to form no character are dropped, as `decode` drops
    them. The concatenated output equals `tok.decode(all ids)`.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self.tok = tok
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: the chunk before the unread tokens
        self._read = 0  # end of what has been emitted

    def _window(self, end: int) -> str:
        ids = self.ids[self._prefix : end]
        return self.tok.decode(ids, self.skip_special, continuation=self._prefix > 0, replacement=True)

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._window(self._read)
        text = self._window(len(self.ids))
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :].replace("\ufffd", "")

    def flush(self) -> str:
        """Whatever is still held back; an unfinished character is dropped."""
        before = self._window(self._read)
        text = self._window(len(self.ids))
        self._prefix = self._read = len(self.ids)
        return text[len(before) :].replace("\ufffd", "")


def _drop_rare_chars(lines: list[str], max_chars: int) -> list[str]:
    """The lines without the characters beyond the `max_chars` most frequent ones."""
    counts = Counter(ch for line in lines for ch in line)
    counts[" "] += len(lines)  # the trainer adds a ▁ in front of every line
    if len(counts) <= max_chars:
        return lines
    keep = {ch for ch, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_chars]}
    kept = ["".join(ch for ch in line if ch in keep) for line in lines]
    return [line for line in kept if line.strip()]


def train_sentencepiece(
    texts: list[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    *,
    character_coverage: float = 0.9995,
    extra_tokens: tuple[str, ...] = (),
) -> Tokenizer:
    """Train a Llama-style BPE sentencepiece model on in-memory texts; write it to `out_dir`.

    Ids: <unk>=0, <s>=1, </s>=2, <pad>=3, then `extra_tokens` (kept whole in any text),
    then 256 byte-fallback pieces, then the learned pieces. Normalization is the identity
    and whitespace is kept as is (as in Llama's tokenizer.model), so transformers' Llama
    tokenizer (legacy=False) and this package's Tokenizer encode text identically.
    Writes tokenizer.model, tokenizer_config.json and special_tokens_map.json; returns the
    loaded Tokenizer. Single-threaded, hence deterministic.

    Chinese text has many distinct characters; only the most frequent ones, at most half of
    the learnable pieces, are trained on (sentencepiece refuses a coverage below 0.98), so
    the rarer ones are spelled with byte pieces.
    """
    import sentencepiece

    out_dir = Path(out_dir)
    # sentencepiece trains on lines; newlines themselves end up as the <0x0A> byte piece
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: no non-empty text to train on; pass a list of strings")
    fixed = 4 + len(extra_tokens) + 256  # specials, extra tokens, byte pieces
    if vocab_size <= fixed + 1:
        raise ValueError(f"train_sentencepiece: vocab_size={vocab_size} leaves no room for learned pieces; use more than {fixed + 1}")
    lines = _drop_rare_chars(lines, max_chars=(vocab_size - fixed) // 2)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            pad_piece="<pad>",
            user_defined_symbols=list(extra_tokens),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"train_sentencepiece: sentencepiece could not train with vocab_size={vocab_size} ({e}); adjust vocab_size") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())

    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    added = {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>", *extra_tokens])
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return Tokenizer(out_dir)
