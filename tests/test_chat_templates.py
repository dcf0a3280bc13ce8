"""Tests for the model's own chat template (templates.resolve_template "auto") against transformers.

Each template is written in the style of a published one (Qwen2.5, Qwen3, Llama-3.1, Mistral,
Llama-2, Yi); each tokenizer is a tiny byte-level BPE tokenizer.json trained here with the
family's special tokens (or a sentencepiece model for Llama-2), loaded both by transformers'
PreTrainedTokenizerFast and by our Tokenizer. Checked: identical ids to apply_chat_template,
prompts with the generation prompt, masks exactly on the assistant spans (and equal to
transformers' assistant masks from {% generation %} blocks), the rewritten-turn rule, errors,
saving the trained template, generation defaults.
"""

import json
import pickle
from datetime import datetime

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanohuatuo.templates import (
    ChatTemplate,
    generation_defaults,
    named_jinja,
    render,
    render_prompt,
    render_text,
    render_turns,
    resolve_template,
    save_chat_template,
    stop_strings,
    stop_token_ids,
)
from nanohuatuo.tokenizer import Tokenizer, train_sentencepiece

# --- templates in the style of the published ones ---------------------------------------------

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# the same with the answers marked, as training templates mark them
QWEN25_GENERATION = QWEN25.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}",
)

QWEN3 = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA31_GENERATION = LLAMA31.replace(
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{%- if message.role == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}",
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

YI = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
)

# --- conversations ------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "你是一名经验丰富的医生。"}
Q1 = {"role": "user", "content": "我头疼了三天，晚上睡不着，怎么办？"}
A1 = {"role": "assistant", "content": "建议您先测量血压，保证充足睡眠。"}
Q2 = {"role": "user", "content": "血压是150/95，需要吃药吗？"}
A2 = {"role": "assistant", "content": " 属于高血压，请到医院就诊。\n"}  # spaces a template may trim
CONVERSATIONS = {
    "single": [Q1, A1],
    "multi": [Q1, A1, Q2, A2],
    "system single": [SYSTEM, Q1, A1],
    "system multi": [SYSTEM, Q1, A1, Q2, A2],
}

LINES = [
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\n我头疼了三天，晚上睡不着，应该吃什么药？<|im_end|>\n<|im_start|>assistant\n建议您先测量血压。<|im_end|>\n",
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "<s>[INST] <<SYS>>\n你是一名医生。\n<</SYS>>\n\n高血压患者需要注意什么？ [/INST] 低盐饮食，规律服药。 </s>",
    "<think>\n先问病史，再看血压。\n</think>\n\n属于高血压，请到医院就诊，保证充足睡眠。",
    "感冒发烧可以先物理降温，多喝水，注意休息。孩子咳嗽有痰，需要去医院看看吗？",
    '<tool_call>\n{"name": "lookup", "arguments": {"drug": "布洛芬"}}\n</tool_call>',
    "Please see a doctor if the fever lasts more than three days.",
]


def byte_level(out, specials, config, added=()):
    """A byte-level BPE tokenizer.json trained on LINES with `specials` (and non-special `added`)."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(LINES, trainer)
    if added:  # like Qwen3's <think>: added tokens that are not special
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False, **config}, ensure_ascii=False))
    return out


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
MISTRAL_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# family -> (template, specials, config, added tokens, end-of-turn text)
FAMILIES = {
    "qwen2.5": (QWEN25, QWEN_SPECIALS, QWEN_CONFIG, (), "<|im_end|>"),
    "qwen3": (QWEN3, QWEN_SPECIALS, QWEN_CONFIG, ("<think>", "</think>"), "<|im_end|>"),
    "llama3.1": (LLAMA31, LLAMA3_SPECIALS, LLAMA3_CONFIG, (), "<|eot_id|>"),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>"], MISTRAL_CONFIG, (), "</s>"),
    "llama2": (LLAMA2, ["<unk>", "<s>", "</s>"], MISTRAL_CONFIG, (), "</s>"),
    "yi": (YI, QWEN_SPECIALS, QWEN_CONFIG, (), "<|im_end|>"),
}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    cache = {}

    def get(family, where="config"):
        if (family, where) not in cache:
            template, specials, config, added, _ = FAMILIES[family]
            out = tmp_path_factory.mktemp(family.replace(".", "_"))
            if where == "config":
                config = {**config, "chat_template": template}
            byte_level(out, specials, config, added)
            if where == "jinja":
                (out / "chat_template.jinja").write_text(template, encoding="utf-8")
            cache[family, where] = out
        return cache[family, where]

    return get


def reference(path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    return tokenizer


def hf_ids(tokenizer, messages, chat_template=None, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=False, **kwargs)


def learned_runs(ids, mask, tok):
    """The text of each maximal run of learned tokens."""
    runs, run = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run, skip_special=False, continuation=True))
            run = []
    return runs


def expected_runs(family, messages):
    """The assistant spans each template trains: the answer as the template writes it, then its end token."""
    end = FAMILIES[family][4]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if family == "llama3.1":
        return [a.strip() + end for a in answers]
    if family == "llama2":
        return [" " + a.strip() + " " + end for a in answers]
    if family == "qwen3":  # earlier answers are rewritten (no think block) and stay context; the last one is learned
        return ["<think>\n\n</think>\n\n" + answers[-1].lstrip("\n") + end]
    return [a + end for a in answers]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_ids_prompts_and_masks_match_transformers(family_dir, family, case):
    messages = CONVERSATIONS[case]
    if family == "mistral" and messages[0]["role"] == "system":
        pytest.skip("Mistral's template refuses system messages (tested below)")
    path = family_dir(family)
    tok, hf = Tokenizer(path), reference(path)
    template = resolve_template(path, "auto", tok)
    assert template.is_jinja and template.name == "auto"
    ids, mask = render(messages, tok, template)
    assert ids == hf_ids(hf, messages)
    assert render_text(messages, tok, template) == hf.apply_chat_template(messages, tokenize=False)
    assert learned_runs(ids, mask, tok) == expected_runs(family, messages)
    # every prompt is what transformers renders with the generation prompt and the start of the
    # training sequence; its answer is learned from the first token on (but for Qwen3's rewritten turns)
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render_prompt(messages[:k], tok, template)
            assert prompt == hf_ids(hf, messages[:k], add_generation_prompt=True)
            assert ids[: len(prompt)] == prompt
            assert mask[len(prompt) - 1] == 0
            assert mask[len(prompt)] == int(family != "qwen3" or k == last)


def test_generation_blocks_give_the_same_masks_as_transformers(family_dir):
    for family, generation in (("qwen2.5", QWEN25_GENERATION), ("llama3.1", LLAMA31_GENERATION)):
        path = family_dir(family)
        tok, hf = Tokenizer(path), reference(path)
        plain, marked = resolve_template(path), ChatTemplate("generation", generation, "test")
        for messages in CONVERSATIONS.values():
            out = hf.apply_chat_template(messages, chat_template=generation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert render(messages, tok, marked) == (out["input_ids"], out["assistant_masks"])
            assert render(messages, tok, plain) == (out["input_ids"], out["assistant_masks"])  # derived by prefixes


def test_qwen3_reasoning_and_the_rewritten_turn_rule(family_dir):
    path = family_dir("qwen3")
    tok, hf = Tokenizer(path), reference(path)
    template = resolve_template(path)
    reasoning = {"role": "assistant", "content": "属于高血压。", "reasoning_content": "先问病史，再看血压。"}
    inline = {"role": "assistant", "content": "<think>\n先问病史。\n</think>\n\n建议您先测量血压。"}
    messages = [Q1, inline, Q2, reasoning]
    ids, mask = render(messages, tok, template)
    assert ids == hf_ids(hf, messages)
    text = hf.apply_chat_template(messages, tokenize=False)
    assert "先问病史。" not in text  # the first answer's reasoning is dropped once a later turn follows
    # the rule: the rewritten first answer is context; the last answer, with its reasoning, is learned
    assert learned_runs(ids, mask, tok) == ["<think>\n先问病史，再看血压。\n</think>\n\n属于高血压。<|im_end|>"]
    # render_turns: one more sequence, the conversation through the first answer as the model generates it
    turns = render_turns(messages, tok, template)
    assert turns[0] == (ids, mask) and len(turns) == 2
    first_ids, first_mask = turns[1]
    assert first_ids == hf_ids(hf, messages[:2])
    assert learned_runs(first_ids, first_mask, tok) == ["<think>\n先问病史。\n</think>\n\n建议您先测量血压。<|im_end|>"]
    # prefix-stable templates give a single sequence
    qwen25 = family_dir("qwen2.5")
    assert render_turns(messages, Tokenizer(qwen25), resolve_template(qwen25)) == [render(messages, Tokenizer(qwen25), resolve_template(qwen25))]
    # template options: Qwen3 with thinking switched off writes an empty think block into the prompt
    off = ChatTemplate("auto", template.source, template.origin, template.special_tokens, (("enable_thinking", False),))
    assert render_prompt([Q1], tok, off) == hf_ids(hf, [Q1], add_generation_prompt=True, enable_thinking=False)


def test_llama31_date_preamble_and_tojson(family_dir):
    path = family_dir("llama3.1")
    tok, hf = Tokenizer(path), reference(path)
    template = resolve_template(path)
    text = render_text([Q1], tok, template, add_generation_prompt=True)
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n\n<|eot_id|>" in text
    # a tool call: transformers' tojson keeps Chinese as is and escapes no HTML
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "lookup", "arguments": {"drug": "布洛芬<b>"}}}]}
    ids, mask = render([Q1, call], tok, template)
    assert ids == hf_ids(hf, [Q1, call])
    assert learned_runs(ids, mask, tok) == ['{"name": "lookup", "parameters": {"drug": "布洛芬<b>"}}<|eot_id|>']
    with pytest.raises(ValueError, match="single tool-calls"):
        render([Q1, {**call, "tool_calls": call["tool_calls"] * 2}], tok, template)


def test_qwen25_default_system_and_tool_call(family_dir):
    path = family_dir("qwen2.5")
    tok, hf = Tokenizer(path), reference(path)
    template = resolve_template(path)
    assert render_text([Q1], tok, template, add_generation_prompt=True).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "lookup", "arguments": {"drug": "布洛芬"}}}]}
    ids, mask = render([Q1, call], tok, template)
    assert ids == hf_ids(hf, [Q1, call])
    assert learned_runs(ids, mask, tok) == ['<tool_call>\n{"name": "lookup", "arguments": {"drug": "布洛芬"}}\n</tool_call><|im_end|>']


def test_stop_ids_and_strings(family_dir):
    for family, end_id, strings in (
        ("qwen2.5", "<|im_end|>", ["<|im_end|>", "<|im_start|>user"]),
        ("llama3.1", "<|eot_id|>", ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"]),
        ("mistral", "</s>", ["</s>", "[INST]"]),
        ("llama2", "</s>", ["</s>", "[INST]"]),
    ):
        path = family_dir(family)
        tok = Tokenizer(path)
        template = resolve_template(path, "auto", tok)
        assert tok.token_to_id(end_id) in stop_token_ids(tok, template)
        assert stop_strings(template) == strings


def test_template_errors_are_clear(family_dir, tmp_path):
    path = family_dir("mistral")
    tok = Tokenizer(path)
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        render([SYSTEM, Q1, A1], tok, resolve_template(path))
    # a template whose earlier text depends on later turns cannot give masks
    unstable = ChatTemplate("x", "{{ messages|length }}{% for m in messages %}{{ m.content + eos_token }}{% endfor %}", "unstable.jinja")
    with pytest.raises(ValueError, match=r"unstable.jinja is not prefix-stable: the prompt for messages\[1\]"):
        render([Q1, A1], tok, unstable)
    broken = ChatTemplate("x", "{% for m in messages %}{{ m.content }", "broken.jinja")
    with pytest.raises(ValueError, match="broken.jinja, line 1"):
        render_prompt([Q1], tok, broken)
    # the sandbox holds
    escape = ChatTemplate("x", "{{ messages.__class__.__mro__ }}", "escape.jinja")
    with pytest.raises(ValueError, match="escape.jinja"):
        render_prompt([Q1], tok, escape)
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        resolve_template(path, "vicuna")


def test_where_the_template_is_found(family_dir, tmp_path):
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    path = family_dir("qwen2.5", "jinja")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": YI}))
    tok, hf = Tokenizer(path), reference(path)
    template = resolve_template(path, "auto", tok)
    assert template.origin.endswith("chat_template.jinja")
    assert render(CONVERSATIONS["multi"], tok, template)[0] == hf_ids(hf, CONVERSATIONS["multi"])
    # the named list form: "default" by default, another by name
    named = tmp_path / "named"
    byte_level(named, QWEN_SPECIALS, {**QWEN_CONFIG, "chat_template": [{"name": "default", "template": QWEN25}, {"name": "yi", "template": YI}]})
    tok, hf = Tokenizer(named), reference(named)
    messages = CONVERSATIONS["system multi"]
    assert render(messages, tok, resolve_template(named))[0] == hf_ids(hf, messages)
    assert render(messages, tok, resolve_template(named, "yi"))[0] == hf_ids(hf, messages, chat_template="yi")
    # "auto" passed straight to render resolves the tokenizer's directory
    assert render(messages, tok, "auto") == render(messages, tok, resolve_template(named))


def test_no_template_falls_back_to_huatuo_with_a_line(tmp_path, capsys):
    byte_level(tmp_path, QWEN_SPECIALS, QWEN_CONFIG)
    template = resolve_template(tmp_path)
    assert template == ChatTemplate("huatuo") and not template.is_jinja
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "has no chat template" in out and "HuatuoGPT template 'huatuo'" in out


def test_template_pickles_and_names_work(family_dir):
    path = family_dir("qwen2.5")
    tok = Tokenizer(path)
    template = resolve_template(path)
    again = pickle.loads(pickle.dumps(template))
    assert again == template and render([Q1, A1], tok, again) == render([Q1, A1], tok, template)
    assert resolve_template(path, template.spec) == template
    assert render([Q1, A1], tok, "chatml") == render([Q1, A1], tok, resolve_template(path, "chatml"))
    assert str(template).startswith("auto (") and str(resolve_template(path, "huatuo")) == "huatuo"


def test_sentencepiece_llama2(tmp_path):
    """Llama-2's template on a sentencepiece tokenizer.model: ids as transformers' Llama tokenizer gives them."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tok = train_sentencepiece(LINES, tmp_path, vocab_size=500)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA2}))
    tok = Tokenizer(tmp_path)
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    hf = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=False, add_bos_token=True,
                        **{k: config[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")})
    template = resolve_template(tmp_path, "auto", tok)
    for messages in CONVERSATIONS.values():
        ids, mask = render(messages, tok, template)
        assert ids == hf_ids(hf, messages, chat_template=LLAMA2)
        assert learned_runs(ids, mask, tok) == expected_runs("llama2", messages)


# --- the trained template travels with the model ----------------------------------------------


def test_save_jinja_template_into_an_empty_dir(family_dir, tmp_path):
    path = family_dir("qwen3")
    tok = Tokenizer(path)
    template = resolve_template(path)
    save_chat_template(tmp_path / "out", tok, template)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").read_text() == QWEN3
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == QWEN3
    messages = CONVERSATIONS["system multi"]
    assert hf_ids(reference(out), messages) == render(messages, tok, template)[0]
    assert resolve_template(out) == ChatTemplate("auto", QWEN3, str(out / "chat_template.jinja"), template.special_tokens)


@pytest.mark.parametrize("name", ["chatml", "huatuo2", "plain"])
def test_save_named_template_renders_the_same_in_transformers(family_dir, tmp_path, name):
    base = family_dir("yi")  # the base has its own (different) template: the trained one must replace it
    tok = Tokenizer(base)
    save_chat_template(tmp_path, tok, name)
    hf = reference(tmp_path)
    for messages in CONVERSATIONS.values():
        assert hf.apply_chat_template(messages, tokenize=False) == render_text(messages, tok, name)
        assert hf_ids(hf, messages) == render(messages, tok, name)[0]
        prompt = messages[:-1]
        assert hf_ids(hf, prompt, add_generation_prompt=True) == render_prompt(prompt, tok, name)
    # loading the output back with "auto" trains the same answers
    ids, mask = render(CONVERSATIONS["multi"], Tokenizer(tmp_path), resolve_template(tmp_path))
    assert (ids, mask) == render(CONVERSATIONS["multi"], tok, name)


def test_save_huatuo_on_sentencepiece(tmp_path):
    """The exported template writes the trained text; tokenized as one string (as transformers does),
    a few ids at segment boundaries differ from render's segment-wise ids ("▁<" vs "▁", "<")."""
    tok = train_sentencepiece(LINES, tmp_path / "base", vocab_size=500)
    save_chat_template(tmp_path / "out", tok, "huatuo")
    assert "<病人>" in named_jinja("huatuo", tok)
    hf = reference(tmp_path / "out")
    for messages in CONVERSATIONS.values():
        text = hf.apply_chat_template(messages, tokenize=False)
        assert text == render_text(messages, tok, "huatuo")
        assert text.startswith("<s>") and text.endswith(messages[-1]["content"] + " </s>")
        assert hf_ids(hf, messages) == tok.encode(text)


def test_generation_defaults(tmp_path):
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [151645, 151643]}))
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "stop_ids": [151645, 151643]}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "stop_ids": [2]}
    # a trained adapter's own generation_config.json wins; one without keeps the base's
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert generation_defaults(tmp_path, adapter) == {"temperature": 0.0, "stop_ids": [2]}
    (adapter / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    assert generation_defaults(tmp_path, adapter) == {"temperature": 0.3}
