"""serve.py's strictness and reach: refused fields, optional model, chat_template_kwargs, CORS,
lm-evaluation-harness's loglikelihood requests, and several LoRA adapters served by name.

The lm-eval test sends the request shapes of its `local-completions` model (tokenized prompts,
echo, logprobs 1, temperature 0, max_tokens 1 or 0) and reads the answer as it does
(token_logprobs[ctxlen:-1], top_logprobs for greediness); the log-probs must be a plain forward
pass's. The LoRA test checks each adapter's greedy tokens against that adapter merged alone.
"""

import json
import os
import threading

import openai
import pytest
import torch

from conftest import tiny_base
from nanohuatuo import Transformer
from nanohuatuo.engine import Engine, SamplingParams
from nanohuatuo.engine_loop import Choice
from nanohuatuo.generate import cut_at_stop, generate
from nanohuatuo.lora import apply_lora, lora_parameters, merge_and_unload, save_adapter
from nanohuatuo.multi_lora import attach_adapters
from nanohuatuo.serve import ServeConfig, main as serve_main, make_server
from nanohuatuo.templates import render_prompt, stop_strings, stop_token_ids
from nanohuatuo.tokenizer import Tokenizer
from test_serve import LINES, NAME, QUESTIONS, TEMPLATE, http, start, tiny, user  # noqa: F401 (tiny: a fixture)


@pytest.fixture(scope="module")
def server(tiny):
    srv = start(tiny, batch_size=4, max_queue=8)
    yield srv
    srv.close()


def chat(srv, **body):
    return http(srv, "/v1/chat/completions", {"model": NAME, "messages": user(QUESTIONS[0]), "max_tokens": 4,
                                              "temperature": 0, **body})


# ----------------------------------------------------------------------------- strictness

REFUSED = [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 100}),
           ("response_format", {"type": "json_object"}),
           ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
           ("tool_choice", "required"), ("best_of", 3), ("suffix", "end"),
           # vLLM's own fields
           ("guided_json", {"type": "object"}), ("guided_choice", ["是", "否"]), ("guided_regex", "[0-9]+"),
           ("structured_outputs", {"choice": ["是"]}), ("include_stop_str_in_output", True),
           ("prompt_logprobs", 1), ("truncate_prompt_tokens", 8),
           # on chat only (completions have echo)
           ("echo", True), ("add_generation_prompt", False), ("continue_final_message", True),
           ("chat_template", "{{ messages[0].content }}")]
COMPLETION_ONLY = ("best_of", "suffix")


@pytest.mark.parametrize("field,value", REFUSED, ids=[r[0] for r in REFUSED])
def test_unhonoured_fields_are_refused_by_name(server, field, value):
    path = "/v1/completions" if field in COMPLETION_ONLY else "/v1/chat/completions"
    body = {"model": NAME, "max_tokens": 2, field: value,
            **({"prompt": "hi"} if path == "/v1/completions" else {"messages": user("hi")})}
    status, _, answer = http(server, path, body)
    assert status == 400, answer
    err = answer["error"]
    assert err["param"] == field and err["code"] == "unsupported_parameter" and f"'{field}'" in err["message"]


def test_neutral_values_and_no_model_are_accepted(server):
    plain = chat(server)[2]
    status, _, answer = chat(server, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, n=1,
                             response_format={"type": "text"}, tools=[], tool_choice="none", user="x")
    assert status == 200 and answer["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    status, _, answer = http(server, "/v1/chat/completions", {"messages": user(QUESTIONS[0]), "max_tokens": 4,
                                                              "temperature": 0})
    assert status == 200 and answer["model"] == NAME  # no 'model': the base answers, as in vLLM
    assert answer["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_numbers_must_be_finite_and_stream_options_need_a_stream(server):
    for field in ("temperature", "top_p", "repetition_penalty"):
        raw = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "%s": NaN}' % (NAME, field)).encode()
        status, _, answer = http(server, "/v1/chat/completions", raw=raw)  # Python's JSON reads NaN
        assert status == 400 and answer["error"]["param"] == field and "finite" in answer["error"]["message"]
    status, _, answer = chat(server, stream_options={"include_usage": True})
    assert status == 400 and answer["error"]["param"] == "stream_options"


def test_stop_token_ids_and_the_completion_default_length(tiny, server):
    """vLLM's stop_token_ids end an answer at that token (not in the text, finish "stop"); a raw
    completion without max_tokens gets OpenAI's and vLLM's 16 tokens, not the rest of the context."""
    _, model, tok = tiny
    prompt = render_prompt(user(QUESTIONS[0]), tok, TEMPLATE)
    out = generate(model, [prompt], 8, stop_ids=())[0]
    assert out[2] not in out[:2]
    status, _, answer = chat(server, max_tokens=8, stop_token_ids=[out[2]])
    assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == tok.decode(out[:2]).rstrip()
    assert answer["usage"]["completion_tokens"] == 3  # the stop token counts, as the end token does
    for bad in ([-1], "7", [True]):
        assert chat(server, stop_token_ids=bad)[2]["error"]["param"] == "stop_token_ids"
    status, _, answer = http(server, "/v1/completions", {"prompt": "血压高", "temperature": 0, "ignore_eos": True})
    assert status == 200 and answer["usage"]["completion_tokens"] == 16
    assert answer["choices"][0]["finish_reason"] == "length"


def test_messages_as_openai_takes_them(tiny, server):
    """Text parts are joined with newlines (as vLLM joins them); a user message needs content; tool
    calls are refused (no tools here); the named template needs turns that alternate."""
    parts = [{"type": "text", "text": "头痛"}, {"type": "text", "text": "怎么办？"}]
    joined = chat(server, messages=user("头痛\n怎么办？"))[2]
    answer = chat(server, messages=[{"role": "user", "content": parts}])[2]
    assert answer["choices"] == joined["choices"]
    assert answer["usage"]["prompt_tokens"] == joined["usage"]["prompt_tokens"]
    for content in (None, [], "missing"):
        message = {"role": "user"} if content == "missing" else {"role": "user", "content": content}
        status, _, answer = chat(server, messages=[message])
        assert status == 400 and answer["error"]["param"] == "messages[0].content"
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    status, _, answer = chat(server, messages=user("hi") + [{"role": "assistant", "content": None,
                                                             "tool_calls": calls}] + user("hi"))
    assert status == 400 and answer["error"]["param"] == "messages[1].tool_calls"
    status, _, answer = chat(server, messages=user("hi") + user("hi"))
    assert status == 400 and "messages[1]: expected an assistant turn" in answer["error"]["message"]


def test_white_space_before_the_template_s_end_and_byte_tokens(tiny, server):
    """Chat drops the white space a template puts before its end (at a stop token or the template's
    stop string), not an answer's own before the client's stop string or at the length limit; a
    byte-fallback token of an ASCII character shows as that character in logprobs, one of a longer
    character as "\\xe5"."""
    _, _, tok = tiny
    ids = tok.encode("多休息 \nX", bos=False)  # "多休息", " ", "\n" (a byte token), "X"
    assert tok.decode(ids) == "多休息 \nX" and tok.id_to_token(ids[2]) == "<0x0A>"

    def answer(tokens, reason, stops=(), end_stops=()):
        choice = Choice(0, 0, tok, list(stops) + list(end_stops), True, end_stops)
        for t in tokens:
            choice.put(t)
        sent = choice.take()[0]
        choice.close(reason)
        return sent + choice.take()[0], choice.finish_reason

    assert answer(ids[:3], "stop") == ("多休息", "stop")  # a stop token after "多休息 \n"
    assert answer(ids[:3], "length") == ("多休息 \n", "length")
    assert answer(ids, "stop", stops=["X"]) == ("多休息 \n", "stop")  # the client's stop string
    assert answer(ids, "stop", end_stops=["X"]) == ("多休息", "stop")  # the template's, spelled as text
    api = server.service.api
    assert api.token_text(ids[2]) == ("\n", [10])
    assert api.token_text(tok.token_to_id("<0xE5>")) == ("\\xe5", [0xE5])


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """A Qwen3-style switch: the template writes a marker when enable_thinking is false."""
    d = tiny_base(tmp_path, LINES, max_seq_len=512).dir
    config = json.load(open(os.path.join(d, "tokenizer_config.json")))
    config["chat_template"] = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% if enable_thinking is defined and "
                               "not enable_thinking %} 不想{% endif %}{% endif %}")
    json.dump(config, open(os.path.join(d, "tokenizer_config.json"), "w"))
    srv = make_server(ServeConfig(model=d, port=0, batch_size=1, log_requests=False)).start()
    try:
        tok = Tokenizer.from_pretrained(d)
        template = srv.service.template
        with_kw = render_prompt(user("头痛"), tok, template, {"enable_thinking": False})
        assert tok.decode(with_kw).endswith("assistant: 不想")
        plain = render_prompt(user("头痛"), tok, template)
        body = {"messages": user("头痛"), "max_tokens": 1, "temperature": 0}
        assert http(srv, "/v1/chat/completions", body)[2]["usage"]["prompt_tokens"] == len(plain)
        answer = http(srv, "/v1/chat/completions", {**body, "chat_template_kwargs": {"enable_thinking": False}})[2]
        assert answer["usage"]["prompt_tokens"] == len(with_kw)
        for bad in ({"messages": []}, "yes"):
            status, _, answer = http(srv, "/v1/chat/completions", {**body, "chat_template_kwargs": bad})
            assert status == 400 and answer["error"]["param"] == "chat_template_kwargs"
        # the model's own template takes what orders of roles it renders, as transformers and vLLM leave it
        late_system = [{"role": "system", "content": "简短"}, {"role": "assistant", "content": "多"}]
        for messages in (user("头痛") + user("发烧"), [{"role": "assistant", "content": "您好"}] + user("头痛"),
                         user("头痛") + late_system):
            status, _, answer = http(srv, "/v1/chat/completions", {**body, "messages": messages})
            assert status == 200 and answer["usage"]["prompt_tokens"] == len(render_prompt(messages, tok, template))
    finally:
        srv.close()


def test_cors(server, tiny):
    preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    import urllib.request
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers=preflight)
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    status, hdrs, _ = http(server, "/v1/models", headers={"Origin": "http://page.example"})
    assert status == 200 and hdrs["Access-Control-Allow-Origin"] == "*"
    status, hdrs, _ = http(server, "/v1/models")
    assert "Access-Control-Allow-Origin" not in hdrs  # no Origin, not a browser: nothing to say
    srv = start(tiny, batch_size=1, cors_origin="http://ok.example", api_key="k")
    try:
        req = urllib.request.Request(srv.url + "/v1/completions", method="OPTIONS",
                                     headers={**preflight, "Origin": "http://ok.example"})
        with urllib.request.urlopen(req, timeout=30) as r:  # a preflight needs no key
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "http://ok.example"
        status, hdrs, _ = http(srv, "/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert status == 200 and "Access-Control-Allow-Origin" not in hdrs
    finally:
        srv.close()
    srv = start(tiny, batch_size=1, cors_origin="none")
    try:
        assert "Access-Control-Allow-Origin" not in http(srv, "/v1/models", headers={"Origin": "http://a.example"})[1]
    finally:
        srv.close()


# ----------------------------------------------------------------------------- lm-evaluation-harness

def forward_logprobs(model, ids):
    """log-softmax of a plain forward pass: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model.logits(model.hidden_states(torch.tensor([ids]))).float()[0], -1)


def lm_eval_reading(choice, ctxlen):
    """(sum of the continuation's log-probs, greedy?) as lm-eval's local-completions reads an answer."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))


def test_lm_eval_loglikelihood_requests(tiny, server):
    _, model, tok = tiny
    contexts = [tok.encode("头痛三天了，", bos=tok.add_bos), tok.encode("孩子咳嗽", bos=tok.add_bos)]
    continuations = [tok.encode("伴有低烧"), tok.encode("有痰怎么办？")]
    prompts = [c + x for c, x in zip(contexts, continuations)]
    # lm-eval's loglikelihood payload (max_tokens 1: the last entry, the generated token, is dropped)
    status, _, answer = http(server, "/v1/completions", {"model": NAME, "prompt": prompts, "temperature": 0,
                                                         "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    assert status == 200, answer
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    for choice, ids, ctx in zip(choices, prompts, contexts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = forward_logprobs(model, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, atol=1e-4)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and choice["text"].startswith(tok.decode(ids))
        total, greedy = lm_eval_reading(choice, len(ctx))
        cont = slice(len(ctx) - 1, len(ids) - 1)
        assert total == pytest.approx(want[cont].sum().item(), abs=1e-4)
        assert greedy == bool((ref[cont].argmax(-1) == torch.tensor(ids[len(ctx):])).all())
    # max_tokens 0 with echo: the prompt's log-probs alone, nothing generated or counted
    status, _, answer = http(server, "/v1/completions", {"prompt": [prompts[0]], "max_tokens": 0, "echo": True,
                                                         "logprobs": 2, "temperature": 0})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["text"] == tok.decode(prompts[0]) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(prompts[0]) and answer["usage"]["completion_tokens"] == 0
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"][1:])
    # max_tokens' other name, max_completion_tokens, scores the prompt alike
    status, _, other = http(server, "/v1/completions", {"prompt": [prompts[0]], "max_completion_tokens": 0,
                                                        "echo": True, "logprobs": 2, "temperature": 0})
    assert status == 200 and other["choices"][0]["text"] == choice["text"] and other["usage"] == answer["usage"]
    # the same through the openai client, with a string prompt
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0)
    r = c.completions.create(model=NAME, prompt="头痛三天了", max_tokens=0, echo=True, logprobs=1, temperature=0)
    ids = tok.encode("头痛三天了", bos=tok.add_bos)
    want = forward_logprobs(model, ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(r.choices[0].logprobs.token_logprobs[1:]), want, atol=1e-4)
    # streamed: the echo (with its log-probs) comes first
    stream = c.completions.create(model=NAME, prompt="头痛三天了", max_tokens=2, echo=True, logprobs=1,
                                  temperature=0, stream=True)
    first = next(iter(stream)).choices[0]
    assert first.text == tok.decode(ids) and first.logprobs.token_logprobs[0] is None
    c.close()
    status, _, answer = http(server, "/v1/completions", {"prompt": "hi", "max_tokens": 0})
    assert status == 400 and answer["error"]["param"] == "max_tokens"  # 0 only with echo


# ----------------------------------------------------------------------------- several LoRA adapters

def random_adapter(d, out, seed):
    model = Transformer.from_pretrained(d)
    apply_lora(model, r=4 + 2 * seed, alpha=8, dropout=0.0,
               targets=["q_proj", "v_proj", "down_proj"] if seed else ["k_proj", "o_proj", "up_proj"])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.5)  # a zero-initialised B would make the adapter a no-op
    save_adapter(model, out)
    return str(out)


def merged(d, adapter):
    return merge_and_unload(Transformer.from_pretrained(d, adapter=adapter)).eval()


def test_engine_mixes_adapters_in_one_batch(tiny, tmp_path):
    d, base, tok = tiny
    dirs = [random_adapter(d, tmp_path / f"a{i}", i) for i in range(2)]
    model = Transformer.from_pretrained(d).eval()
    assert attach_adapters(model, {"a": dirs[0], "b": dirs[1]}) == ["a", "b"]
    prompts = [tok.encode(q, bos=tok.add_bos) for q in QUESTIONS[:3]]
    eng = Engine(model, slots=6)
    rids = {}
    for p in prompts:  # every prompt under the base and both adapters, all in one running batch
        for a in range(3):
            rids[eng.add(p, SamplingParams(max_new_tokens=8), adapter=a)] = (tuple(p), a)
    got = {}
    while eng.has_work():
        for ev in eng.step():
            got.setdefault(rids[ev.rid], []).append(ev.token)
    refs = [base, merged(d, dirs[0]), merged(d, dirs[1])]
    for (p, a), tokens in got.items():
        assert tokens == generate(refs[a], [list(p)], 8)[0], (p, a)
    assert got[(tuple(prompts[0]), 1)] != got[(tuple(prompts[0]), 0)]
    with pytest.raises(ValueError, match="adapter=3"):
        eng.add(prompts[0], SamplingParams(), adapter=3)


def test_server_serves_adapters_by_name(tiny, tmp_path):
    d, base, tok = tiny
    dirs = [random_adapter(d, tmp_path / f"a{i}", i) for i in range(2)]
    srv = start(tiny, batch_size=4, lora=[f"triage={dirs[0]}", f"peds={dirs[1]}"])
    try:
        status, _, models = http(srv, "/v1/models")
        assert [m["id"] for m in models["data"]] == [NAME, "triage", "peds"]
        assert [m["parent"] for m in models["data"]] == [None, NAME, NAME]
        ids = render_prompt(user(QUESTIONS[0]), tok, TEMPLATE)
        stops = stop_token_ids(tok, TEMPLATE)
        answers = {}

        def ask(name):
            answers[name] = http(srv, "/v1/chat/completions", {"model": name, "messages": user(QUESTIONS[0]),
                                                               "max_tokens": 10, "temperature": 0})[2]
        threads = [threading.Thread(target=ask, args=(n,)) for n in (NAME, "triage", "peds")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, ref in ((NAME, base), ("triage", merged(d, dirs[0])), ("peds", merged(d, dirs[1]))):
            want = generate(ref, [ids], 10, stop_ids=stops)[0]
            whole = tok.decode([t for t in want if t not in stops])
            text = cut_at_stop(whole, stop_strings(TEMPLATE))
            if text != whole or want[-1] in stops:  # the template's end: the white space before it is not the answer's
                text = text.rstrip()
            assert answers[name]["model"] == name and answers[name]["choices"][0]["message"]["content"] == text
        assert len({a["choices"][0]["message"]["content"] for a in answers.values()}) == 3
        assert http(srv, "/v1/chat/completions", {"model": "nope", "messages": user("hi")})[0] == 404
    finally:
        srv.close()


def test_bad_lora_flags(tiny, tmp_path, capsys):
    for flags, says in ((["--lora", "noequals"], "NAME=DIR"), (["--lora", f"a={tmp_path}/missing"], "no such"),
                        (["--lora", f"{NAME}={tmp_path}"], "taken"),
                        (["--lora", f"a={tmp_path}", "--compile"], "--compile")):
        assert serve_main(["--model", tiny[0], "--served-model-name", NAME, "--port", "0", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and says in err and "Traceback" not in err
