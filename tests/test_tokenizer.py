"""Tests for nanohuatuo.tokenizer: both backends against transformers, stream decoding, saving, training."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanohuatuo.tokenizer import StreamDecoder, Tokenizer, train_sentencepiece

LINES = [
    "你好，医生。我头疼了三天，晚上睡不着，应该吃什么药？",
    "高血压患者需要注意低盐饮食，每天盐的摄入量不超过5克。",
    "糖尿病的早期症状有哪些？多饮、多尿、多食和体重下降。",
    "感冒发烧38.5度，可以先物理降温，多喝水，注意休息。",
    "孩子咳嗽有痰，晚上咳得厉害，需要去医院看看吗？",
    "建议您尽快到医院做血常规和胸片检查，明确病因后再用药。",
    "胃痛、反酸、烧心，可能是胃食管反流病，建议做胃镜。",
    "请问布洛芬和对乙酰氨基酚有什么区别？",
    "孕妇在怀孕期间用药一定要在医生指导下进行。",
    "如果出现胸痛、呼吸困难，请立即拨打120急救电话。",
    "I have had a headache for three days and cannot sleep at night.",
    "Patients with high blood pressure should eat less salt.",
    "What are the early symptoms of diabetes?",
    "Drink more water, rest well, and take your temperature twice a day.",
    "Please see a doctor if the fever lasts more than three days.",
    "The doctor said: take 1 tablet of ibuprofen (200 mg) after meals.",
    "HuatuoGPT gives accurate, detailed and warm medical advice.",
    "<病人>：我最近总是失眠怎么办？ <HuatuoGPT>：失眠可能与压力、作息不规律有关。",
    "<病人>：What should I eat with a cold? <HuatuoGPT>：Warm soup, fruit and plenty of water.",
    "多吃蔬菜水果，少吃油腻辛辣的食物，保持心情舒畅。",
]

# Plain text, punctuation, digits, spaces, newlines, and 龘 / 🩺 which are not in LINES (byte fallback).
TEXTS = [
    "你好，医生！我头疼。",
    "高血压（hypertension）患者：每天盐<5克。",
    "Hello doctor, I have a fever of 38.5 degrees.",
    "罕见字：龘，还有🩺。",
    "第一行\n第二行\n\n第三行",
    "two  spaces and a tab\there",
    " leading space",
    "trailing space ",
    "x</s>y",
    "",
]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    train_sentencepiece(LINES, out, vocab_size=600)
    return out


def llama_reference(model_dir):
    """transformers' Llama tokenizer for a tokenizer.model, built the way AutoTokenizer builds it.

    AutoTokenizer reads tokenizer.model through protobuf; where that package is missing this
    builds the same LlamaTokenizer from the sentencepiece vocab and the merges transformers derives.
    """
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        legacy=config["legacy"],
        add_bos_token=config["add_bos_token"],
        **{key: config[key] for key in ("unk_token", "bos_token", "eos_token", "pad_token")},
    )


@pytest.fixture(scope="module", params=["llama", "auto"])
def spm_reference(request, spm_dir):
    if request.param == "llama":
        return llama_reference(spm_dir)
    from transformers.utils import is_protobuf_available

    if not is_protobuf_available():
        pytest.skip("transformers' AutoTokenizer needs protobuf to read tokenizer.model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spm_dir)


def test_spm_special_ids(spm_dir):
    tok = Tokenizer.from_pretrained(spm_dir)
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.stop_ids == {2}
    assert tok.add_bos is True
    assert [tok.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.token_to_id("<pad>") == 3 and tok.token_to_id("not-a-piece") is None
    assert tok.vocab_size == 600


def test_spm_matches_transformers(spm_dir, spm_reference):
    tok = Tokenizer.from_pretrained(spm_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == spm_reference(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text, bos=True) == spm_reference(text)["input_ids"], text
        assert tok.decode(ids) == spm_reference.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special=False) == spm_reference.decode(ids), text


def test_spm_byte_fallback_and_round_trip(spm_dir):
    tok = Tokenizer.from_pretrained(spm_dir)
    # 龘 is U+9F98, absent from the training text: three byte pieces
    assert [tok.id_to_token(i) for i in tok.encode("龘", continuation=True)] == ["<0xE9>", "<0xBE>", "<0x98>"]
    for text in LINES + TEXTS[:6]:
        assert tok.decode(tok.encode(text)) == text


def test_spm_continuation(spm_dir):
    tok = Tokenizer.from_pretrained(spm_dir)
    first, rest = "头疼三天，", "晚上睡不着 at night"
    assert tok.id_to_token(tok.encode(first)[0]).startswith("▁")
    assert not tok.id_to_token(tok.encode(first, continuation=True)[0]).startswith("▁")
    ids = tok.encode(first) + tok.encode(rest, continuation=True)
    assert tok.decode(ids) == first + rest
    assert tok.decode(tok.encode(" x", continuation=True), continuation=True) == " x"


def test_train_sentencepiece_is_deterministic_and_checks_vocab(tmp_path, spm_dir):
    train_sentencepiece(LINES, tmp_path / "again", vocab_size=600)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (spm_dir / "tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_sentencepiece(LINES, tmp_path / "small", vocab_size=100)


def test_train_sentencepiece_many_characters_small_vocab(tmp_path):
    # 400 distinct characters do not fit in 300 pieces: the rare ones become byte pieces
    lines = ["".join(chr(0x4E00 + (7 * i + j) % 400) for j in range(30)) for i in range(60)]
    tok = train_sentencepiece(lines, tmp_path, vocab_size=300)
    assert tok.vocab_size == 300
    assert all(tok.decode(tok.encode(line)) == line for line in lines)


def test_stream_decoder_never_splits_a_character(spm_dir):
    tok = Tokenizer.from_pretrained(spm_dir)
    ids = [tok.bos_id]
    for text in TEXTS:
        ids += tok.encode(text, continuation=len(ids) > 1) + [tok.eos_id]
    for skip_special in (True, False):
        stream = StreamDecoder(tok, skip_special=skip_special)
        pieces = [stream.put(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special=skip_special)
        assert not any("\ufffd" in piece for piece in pieces)
    stream = StreamDecoder(tok)
    assert [stream.put(i) for i in tok.encode("龘", continuation=True)] == ["", "", "龘"]


def test_spm_save_pretrained(tmp_path, spm_dir):
    tok = Tokenizer.from_pretrained(spm_dir)
    tok.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


# --- tokenizer.json (byte-level BPE, Qwen-like special tokens) ---------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bytelevel")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(LINES, trainer)
    tk.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        # the older dict form of a special token, as many hub models still write it
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return out


def test_json_special_ids(json_dir):
    tok = Tokenizer.from_pretrained(json_dir)
    assert tok.backend == "tokenizers"
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (None, 2, 0, False)
    assert tok.stop_ids == {0, 2}
    im_start = "<|im_start|>user\n你好，医生<|im_end|>\n"
    ids = tok.encode(im_start)
    assert ids[0] == 1 and ids[-2] == 2 and tok.id_to_token(ids[-1]) == "Ċ"


def test_json_matches_transformers(json_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.from_pretrained(json_dir)
    references = [AutoTokenizer.from_pretrained(json_dir), PreTrainedTokenizerFast(tokenizer_file=str(json_dir / "tokenizer.json"))]
    texts = TEXTS + ["<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\n头疼<|im_end|><|endoftext|>"]
    for reference in references:
        for text in texts:
            ids = tok.encode(text)
            assert ids == reference(text, add_special_tokens=False)["input_ids"], text
            assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
            assert tok.decode(ids, skip_special=False) == reference.decode(ids) == text, text


def test_json_stream_decoder(json_dir):
    tok = Tokenizer.from_pretrained(json_dir)
    ids = tok.encode("<|im_start|>assistant\n罕见字：龘，还有🩺。<|im_end|>")
    stream = StreamDecoder(tok)
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "assistant\n罕见字：龘，还有🩺。"
    assert not any("\ufffd" in piece for piece in pieces)


def test_json_pad_fallback_is_not_eos(tmp_path, json_dir):
    (tmp_path / "tokenizer.json").write_bytes((json_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (2, 0, {2})


def test_json_save_pretrained(tmp_path, json_dir):
    Tokenizer.from_pretrained(json_dir).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert Tokenizer.from_pretrained(tmp_path).stop_ids == {0, 2}


def test_metaspace_json_agrees_with_sentencepiece(tmp_path, spm_dir):
    # transformers' own tokenizer.json for the same model: both backends give the same ids
    llama_reference(spm_dir).save_pretrained(tmp_path)
    from_json, from_spm = Tokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(spm_dir)
    assert from_json.backend == "tokenizers"
    for text in TEXTS:
        for continuation in (False, True):
            ids = from_spm.encode(text, continuation=continuation)
            assert from_json.encode(text, continuation=continuation) == ids, text
            assert from_json.decode(ids, continuation=continuation) == from_spm.decode(ids, continuation=continuation)


# --- special tokens, offsets, and decoding without U+FFFD --------------------------------------


def test_special_tokens_as_transformers_passes_them(spm_dir, json_dir):
    from transformers import AutoTokenizer

    assert Tokenizer.from_pretrained(spm_dir).special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tok = Tokenizer.from_pretrained(json_dir)
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert tok.special_tokens == AutoTokenizer.from_pretrained(json_dir).special_tokens_map


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizers"])
def test_encode_offsets(spm_dir, json_dir, backend):
    tok = Tokenizer.from_pretrained(spm_dir if backend == "sentencepiece" else json_dir)
    for text in TEXTS + ["<|im_start|>user\n罕见字：龘<|im_end|>\n", "</s>头疼 x</s>"]:
        ids, offsets = tok.encode_offsets(text)
        assert ids == tok.encode(text), text
        assert all(0 <= a < b <= len(text) for a, b in offsets), text
        assert all(a2 >= a1 and b2 >= b1 for (a1, b1), (a2, b2) in zip(offsets, offsets[1:])), text
        # each token decodes to the text it covers (up to the ▁ that stands for a space; a lone
        # prefix ▁ and a character's byte pieces share the span of the character they start)
        for token_id, (a, b) in zip(ids, offsets):
            piece = tok.decode([token_id], skip_special=False, continuation=True, replacement=True)
            assert "\ufffd" in piece or piece.strip() in ("", text[a:b].strip()), (text, piece, text[a:b])
    # the byte pieces of a character share its span
    ids, offsets = tok.encode_offsets("头龘")
    assert set(offsets) == {(0, 1), (1, 2)} and offsets[-1] == (1, 2)
    if backend == "sentencepiece":
        assert [tok.id_to_token(i) for i in ids[-3:]] == ["<0xE9>", "<0xBE>", "<0x98>"] and offsets[-3:] == [(1, 2)] * 3


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizers"])
def test_decode_drops_incomplete_characters(spm_dir, json_dir, backend):
    tok = Tokenizer.from_pretrained(spm_dir if backend == "sentencepiece" else json_dir)
    rare = tok.encode("龘", continuation=True)  # U+9F98: byte pieces (sentencepiece) or partial bytes (byte-level)
    assert tok.decode(rare) == "龘"
    good = tok.encode("你好，医生。", continuation=True)
    cut = rare[:-1]
    # cut mid-character at the end, or a stray lead byte in the middle: no U+FFFD either way
    assert tok.decode(good + cut) == "你好，医生。"
    assert tok.decode(cut + good) == "你好，医生。"
    assert "\ufffd" in tok.decode(good + cut, replacement=True)
    stream = StreamDecoder(tok)
    ids = good + cut + good + rare + cut
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == "你好，医生。你好，医生。龘"
    assert not any("\ufffd" in piece for piece in pieces)
