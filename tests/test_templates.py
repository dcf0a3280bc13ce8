"""Tests for nanohuatuo.templates: exact text and masks per template, prompt prefixes, errors, guessing."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from nanohuatuo.templates import (
    HUATUO_SYSTEM,
    TEMPLATES,
    default_system,
    guess_template,
    render,
    render_prompt,
    show,
    stop_strings,
    stop_token_ids,
)
from nanohuatuo.tokenizer import Tokenizer, train_sentencepiece

LINES = [
    HUATUO_SYSTEM,
    "<病人>：我头疼了三天，晚上睡不着，应该吃什么药？ <HuatuoGPT>：建议您先测量血压，保证充足睡眠。",
    "<问>：高血压患者需要注意什么？\n<答>：低盐饮食，规律服药，定期复查。",
    "User: What are the early symptoms of diabetes?",
    "Assistant: Thirst, frequent urination and weight loss.",
    "感冒发烧可以先物理降温，多喝水，注意休息。",
    "孩子咳嗽有痰，需要去医院看看吗？",
    "Please see a doctor if the fever lasts more than three days.",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHAT = [
    {"role": "user", "content": "我头疼了三天，怎么办？"},
    {"role": "assistant", "content": "建议您先测量血压。"},
    {"role": "user", "content": "血压是150/95。"},
    {"role": "assistant", "content": "属于高血压，请到医院就诊。"},
]
SYSTEM = {"role": "system", "content": "你是一名医生。"}


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(LINES, out, vocab_size=500, extra_tokens=("<reserved_106>", "<reserved_107>"))


@pytest.fixture(scope="module")
def spm_plain(tmp_path_factory):
    return train_sentencepiece(LINES, tmp_path_factory.mktemp("spm_plain"), vocab_size=500)


def byte_level(out, config, bos_first=False):
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(LINES, trainer)
    if bos_first:  # like Llama-3's tokenizer.json: the post-processor adds <|begin_of_text|>
        tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 3)])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False}
    return byte_level(tmp_path_factory.mktemp("qwen"), config)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False}
    return byte_level(tmp_path_factory.mktemp("llama3"), config, bos_first=True)


def trained_text(ids, mask, tok):
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False, continuation=True)


def check_prefixes(messages, tok, template):
    ids, _ = render(messages, tok, template)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render_prompt(messages[:k], tok, template)
            assert ids[: len(prompt)] == prompt
            assert render(messages[: k + 1], tok, template)[0][: len(prompt)] == prompt


def test_huatuo(spm):
    ids, mask = render(CHAT, spm, "huatuo")
    assert spm.decode(ids) == (
        HUATUO_SYSTEM + "<病人>：我头疼了三天，怎么办？ <HuatuoGPT>：建议您先测量血压。 "
        "<病人>：血压是150/95。 <HuatuoGPT>：属于高血压，请到医院就诊。 "
    )
    assert trained_text(ids, mask, spm) == "<HuatuoGPT>：建议您先测量血压。 </s><HuatuoGPT>：属于高血压，请到医院就诊。 </s>"
    assert ids[0] == spm.bos_id and mask[0] == 0
    assert ids[-1] == spm.eos_id and mask[-1] == 1
    # the segments, tokenized one by one
    expected = [spm.bos_id] + spm.encode(HUATUO_SYSTEM)
    mask_expected = [0] * len(expected)
    for question, answer in (("我头疼了三天，怎么办？", "建议您先测量血压。"), ("血压是150/95。", "属于高血压，请到医院就诊。")):
        user = spm.encode(f"<病人>：{question} ", continuation=True)
        tag = spm.encode("<HuatuoGPT>：", continuation=True)
        reply = spm.encode(f"{answer} ", continuation=True) + [spm.eos_id]
        expected += user + tag + reply
        mask_expected += [0] * len(user) + [1] * (len(tag) + len(reply))
    assert (ids, mask) == (expected, mask_expected)
    prompt = render_prompt(CHAT[:3], spm, "huatuo")
    assert spm.decode(prompt).endswith("<病人>：血压是150/95。 <HuatuoGPT>：")
    check_prefixes(CHAT, spm, "huatuo")


def test_huatuo_system_replaces_default(spm):
    ids, mask = render([SYSTEM] + CHAT[:2], spm, "huatuo")
    assert spm.decode(ids) == "你是一名医生。<病人>：我头疼了三天，怎么办？ <HuatuoGPT>：建议您先测量血压。 "
    assert default_system("huatuo") == HUATUO_SYSTEM
    assert stop_strings("huatuo") == ["<病人>"]


def test_huatuo2(spm):
    ids, mask = render([SYSTEM] + CHAT, spm, "huatuo2")
    assert spm.decode(ids) == (
        "你是一名医生。\n<问>：我头疼了三天，怎么办？\n<答>：建议您先测量血压。\n<问>：血压是150/95。\n<答>：属于高血压，请到医院就诊。"
    )
    assert trained_text(ids, mask, spm) == "建议您先测量血压。</s>属于高血压，请到医院就诊。</s>"
    assert spm.decode(render(CHAT[:2], spm, "huatuo2")[0]) == "<问>：我头疼了三天，怎么办？\n<答>：建议您先测量血压。"
    check_prefixes([SYSTEM] + CHAT, spm, "huatuo2")


def test_plain(spm):
    ids, mask = render(CHAT, spm, "plain")
    assert spm.decode(ids) == (
        "User: 我头疼了三天，怎么办？\nAssistant:\n建议您先测量血压。\nUser: 血压是150/95。\nAssistant:\n属于高血压，请到医院就诊。"
    )
    assert trained_text(ids, mask, spm) == "建议您先测量血压。</s>属于高血压，请到医院就诊。</s>"
    assert sum(mask) == len(spm.encode("建议您先测量血压。", continuation=True) + spm.encode("属于高血压，请到医院就诊。", continuation=True)) + 2
    check_prefixes(CHAT, spm, "plain")


QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def hf_chat(tok, jinja, messages, **kwargs):
    """transformers' rendering of the same conversation: (text, ids)."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tok.path)
    text = reference.apply_chat_template(messages, chat_template=jinja, tokenize=False, **kwargs)
    return text, reference(text, add_special_tokens=False)["input_ids"]


def test_chatml(qwen):
    ids, mask = render(CHAT, qwen, "chatml")
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n我头疼了三天，怎么办？<|im_end|>\n<|im_start|>assistant\n建议您先测量血压。<|im_end|>\n"
        "<|im_start|>user\n血压是150/95。<|im_end|>\n<|im_start|>assistant\n属于高血压，请到医院就诊。<|im_end|>"
    )
    assert qwen.decode(ids, skip_special=False) == expected
    assert trained_text(ids, mask, qwen) == "建议您先测量血压。<|im_end|>属于高血压，请到医院就诊。<|im_end|>"
    # transformers with Qwen2's template: same text (it adds "\n" after the last turn), same ids
    text, reference_ids = hf_chat(qwen, QWEN2_TEMPLATE, CHAT)
    assert text == expected + "\n" and reference_ids == ids + qwen.encode("\n")
    _, prompt_ids = hf_chat(qwen, QWEN2_TEMPLATE, CHAT[:3], add_generation_prompt=True)
    assert render_prompt(CHAT[:3], qwen, "chatml") == prompt_ids
    assert stop_token_ids(qwen, "chatml") == {qwen.token_to_id("<|im_end|>")}
    check_prefixes(CHAT, qwen, "chatml")


def test_chatml_given_or_empty_system(qwen):
    text = qwen.decode(render([SYSTEM] + CHAT[:2], qwen, "chatml")[0], skip_special=False)
    assert text.startswith("<|im_start|>system\n你是一名医生。<|im_end|>\n<|im_start|>user\n")
    text = qwen.decode(render([{"role": "system", "content": ""}] + CHAT[:2], qwen, "chatml")[0], skip_special=False)
    assert text.startswith("<|im_start|>user\n")


def test_llama3(llama3):
    assert llama3.add_bos and llama3.bos_id == 3
    messages = [SYSTEM] + CHAT
    ids, mask = render(messages, llama3, "llama3")
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是一名医生。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n我头疼了三天，怎么办？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n建议您先测量血压。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n血压是150/95。<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n属于高血压，请到医院就诊。<|eot_id|>"
    )
    assert llama3.decode(ids, skip_special=False) == expected
    assert trained_text(ids, mask, llama3) == "建议您先测量血压。<|eot_id|>属于高血压，请到医院就诊。<|eot_id|>"
    text, reference_ids = hf_chat(llama3, LLAMA3_TEMPLATE, messages)
    assert (text, reference_ids) == (expected, ids)
    _, prompt_ids = hf_chat(llama3, LLAMA3_TEMPLATE, messages[:4], add_generation_prompt=True)
    assert render_prompt(messages[:4], llama3, "llama3") == prompt_ids
    check_prefixes(messages, llama3, "llama3")


def test_baichuan2(spm):
    user, bot = spm.token_to_id("<reserved_106>"), spm.token_to_id("<reserved_107>")
    ids, mask = render([SYSTEM] + CHAT, spm, "baichuan2")
    assert spm.decode(ids, skip_special=False) == (
        "<s> 你是一名医生。<reserved_106>我头疼了三天，怎么办？<reserved_107>建议您先测量血压。</s>"
        "<reserved_106>血压是150/95。<reserved_107>属于高血压，请到医院就诊。</s>"
    )
    assert trained_text(ids, mask, spm) == "建议您先测量血压。</s>属于高血压，请到医院就诊。</s>"
    assert [i for i in ids if i in (user, bot)] == [user, bot, user, bot]
    assert all(m == 0 for i, m in zip(ids, mask) if i in (user, bot))
    check_prefixes([SYSTEM] + CHAT, spm, "baichuan2")


def test_baichuan2_fallback_ids(spm_plain, qwen):
    # tokenizers without <reserved_106>/<reserved_107> get Baichuan2's ids 195/196
    for tok in (spm_plain, qwen):
        ids, mask = render(CHAT[:2], tok, "baichuan2")
        assert [i for i in ids if i in (195, 196)] == [195, 196]
        assert ids[-1] == tok.eos_id and mask[-1] == 1


def test_show(qwen, spm):
    ids, mask = render(CHAT[:2], qwen, "chatml")
    body = "<|im_start|>user\n我头疼了三天，怎么办？<|im_end|>\n<|im_start|>assistant\n"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert show(ids, mask, qwen, color=False) == system + body + "[[建议您先测量血压。<|im_end|>]]"
    assert show(ids, mask, qwen, color=True) == system + body + "\033[32m建议您先测量血压。<|im_end|>\033[0m"
    ids, mask = render(CHAT[:2], spm, "huatuo")
    assert show(ids, mask, spm, color=False).endswith("怎么办？ [[<HuatuoGPT>：建议您先测量血压。 </s>]]")


@pytest.mark.parametrize(
    "messages, where",
    [
        ([], "messages: empty"),
        ([CHAT[1]], r"messages\[0\]: expected a user turn"),
        ([CHAT[0], CHAT[0], CHAT[1]], r"messages\[1\]: expected an assistant turn"),
        ([CHAT[0], SYSTEM, CHAT[1]], r"messages\[1\]: a system message may only come first"),
        ([{"role": "doctor", "content": "x"}], r"messages\[0\]: unknown role"),
        ([CHAT[0], {"role": "assistant", "content": None}], r"messages\[1\]: need a dict"),
        (CHAT[:3], r"messages\[2\]: conversation ends with 'user'"),
        ([SYSTEM], r"messages\[0\]: conversation ends with 'system'"),
    ],
)
def test_render_rejects_malformed(spm, messages, where):
    with pytest.raises(ValueError, match=where):
        render(messages, spm, "huatuo")


def test_render_prompt_needs_a_user_turn_last(spm):
    with pytest.raises(ValueError, match=r"messages\[1\]: .*a prompt ends with the user message"):
        render_prompt(CHAT[:2], spm, "huatuo")


def test_unknown_template_and_missing_tokens(spm):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        render(CHAT, spm, "vicuna")
    with pytest.raises(ValueError, match="needs the token '<\\|im_start\\|>'"):
        render(CHAT, spm, "chatml")


def test_every_template_is_complete():
    keys = {"system", "default_system", "user", "separator", "assistant_open", "train_open", "assistant", "end", "tokens", "stop_strings", "bos"}
    for name, template in TEMPLATES.items():
        assert keys <= set(template), name


@pytest.mark.parametrize(
    "name, files, expected",
    [
        ("qwen", {"tokenizer_config.json": {"chat_template": QWEN2_TEMPLATE}}, "chatml"),
        ("llama", {"tokenizer_config.json": {"chat_template": LLAMA3_TEMPLATE}}, "llama3"),
        ("named", {"tokenizer_config.json": {"chat_template": [{"name": "default", "template": QWEN2_TEMPLATE}]}}, "chatml"),
        ("bc", {"generation_config.json": {"user_token_id": 195}}, "baichuan2"),
        ("bc2", {"config.json": {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan"}}, "baichuan2"),
        ("HuatuoGPT-II-7B", {"config.json": {"model_type": "baichuan", "user_token_id": 195}}, "huatuo2"),
        ("HuatuoGPT-7B", {"config.json": {"model_type": "baichuan"}}, "huatuo"),
        ("ckpt", {"config.json": {"_name_or_path": "FreedomIntelligence/HuatuoGPT2-7B"}}, "huatuo2"),
        ("q", {"config.json": {"model_type": "qwen2"}}, "chatml"),
        ("l3", {"config.json": {"model_type": "llama", "vocab_size": 128256}}, "llama3"),
        ("l2", {"config.json": {"model_type": "llama", "vocab_size": 32000}}, "huatuo"),
        ("empty", {}, "huatuo"),
    ],
)
def test_guess_template(tmp_path, name, files, expected):
    model_dir = tmp_path / name
    model_dir.mkdir()
    for file, content in files.items():
        (model_dir / file).write_text(json.dumps(content))
    assert guess_template(model_dir) == expected


def test_guess_template_reads_chat_template_jinja(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(QWEN2_TEMPLATE)
    assert guess_template(tmp_path) == "chatml"


def test_named_templates_as_resolved_objects(tmp_path, spm, qwen):
    from nanohuatuo.templates import ChatTemplate, resolve_template

    for name, tok in (("huatuo", spm), ("huatuo2", spm), ("chatml", qwen)):
        template = resolve_template(tmp_path, name)
        assert template == ChatTemplate(name) and not template.is_jinja and str(template) == name
        assert render(CHAT, tok, template) == render(CHAT, tok, name)
        assert render_prompt(CHAT[:3], tok, template) == render_prompt(CHAT[:3], tok, name)
        assert stop_token_ids(tok, template) == stop_token_ids(tok, name)
        assert stop_strings(template) == stop_strings(name) and default_system(template) == default_system(name)


# --- fitting a prompt into the context, and where a model's template comes from ------------


def test_fit_prompt_drops_whole_turns_and_keeps_system_and_question(spm):
    from nanohuatuo.templates import PromptTooLong, fit_prompt

    msgs = [SYSTEM] + CHAT * 3 + [{"role": "user", "content": "最后的问题"}]
    full = render_prompt(msgs, spm, "huatuo")
    assert fit_prompt(msgs, spm, "huatuo", len(full)) == full
    # one token short: exactly the oldest question and its answer go
    assert fit_prompt(msgs, spm, "huatuo", len(full) - 1) == render_prompt([SYSTEM] + msgs[3:], spm, "huatuo")
    last = render_prompt([SYSTEM, msgs[-1]], spm, "huatuo")
    assert fit_prompt(msgs, spm, "huatuo", len(last)) == last
    with pytest.raises(PromptTooLong, match=rf"the question with the system message is {len(last)} tokens, but only "
                                            rf"{len(last) - 1} of the context") as e:
        fit_prompt(msgs, spm, "huatuo", len(last) - 1)
    assert e.value.ids == last and e.value.budget == len(last) - 1 and isinstance(e.value, ValueError)
    with pytest.raises(PromptTooLong, match=r"^the question is"):
        fit_prompt(msgs[-1:], spm, "huatuo", 3)


def test_prompt_budget():
    from nanohuatuo.templates import prompt_budget

    assert prompt_budget(512, 1024, 12) == 500 and prompt_budget(512, 100, 12) == 88
    with pytest.raises(ValueError, match=r"--max-new-tokens 512 leaves no room for a prompt in a 512-token context"
                                         r" \(the model's max_seq_len is 512\); lower --max-new-tokens$"):
        prompt_budget(512, 1024, 512)
    with pytest.raises(ValueError, match=r"lower --max-new-tokens or raise --max-len$"):
        prompt_budget(512, 100, 100)
    with pytest.raises(ValueError, match=r"--max-new-tokens 0 leaves no room"):
        prompt_budget(512, 100, 0)


def test_tokenizer_and_template_prefer_what_the_adapter_carries(tmp_path, spm, qwen):
    from nanohuatuo.templates import ChatTemplate, render_text, save_chat_template, tokenizer_and_template

    base, adapter, bare = tmp_path / "base", tmp_path / "adapter", tmp_path / "bare"
    qwen.save_pretrained(base)
    (base / "chat_template.jinja").write_text(QWEN2_TEMPLATE)
    tok, template = tokenizer_and_template(base)
    assert tok.path == base and template.source == QWEN2_TEMPLATE
    # an SFT output: the tokenizer and the template it was trained with, next to the adapter
    save_chat_template(adapter, spm, "huatuo")
    tok, template = tokenizer_and_template(base, adapter)
    assert tok.path == adapter and template.is_jinja and template.origin == str(adapter / "chat_template.jinja")
    assert render_text(CHAT[:3], tok, template, True) == render_text(CHAT[:3], spm, "huatuo", True)
    # an adapter with neither: the base's tokenizer and template; a named template is taken as asked
    bare.mkdir()
    assert tokenizer_and_template(base, bare)[1].source == QWEN2_TEMPLATE
    assert tokenizer_and_template(base, bare, "chatml")[1] == ChatTemplate("chatml")
