"""serve.py: the OpenAI-compatible server on a tiny model, driven by the real `openai` client.

Every greedy answer is checked against generate.generate on the same prompt; bad requests get
their status and an OpenAI-style body while the server keeps serving; concurrent streams each get
their own answer; a client that goes away frees its slot; the API key is enforced.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from conftest import tiny_base
from nanohuatuo import Transformer
from nanohuatuo.generate import cut_at_stop, generate
from nanohuatuo.lora import apply_lora, lora_parameters, merge_and_unload, save_adapter
from nanohuatuo.serve import ServeConfig, main as serve_main, make_server, served_name
from nanohuatuo.templates import render_prompt, resolve_template, stop_strings, stop_token_ids
from nanohuatuo.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = ["头痛三天了，伴有低烧，需要吃什么药？", "建议多休息，多喝水，体温超过38.5度可以服用退烧药。",
         "孩子咳嗽有痰怎么办？", "可以先观察，注意保暖，如果持续加重请及时就医。", "血压高需要注意什么？",
         "少盐少油，规律作息，按时服药，定期复查。"] * 3
QUESTIONS = ["头痛怎么办？", "孩子咳嗽有痰", "血压高需要注意什么？", "低烧三天", "需要吃什么药？",
             "如何保暖", "多喝水有用吗", "定期复查什么"]
NAME = "tiny"
TEMPLATE = "huatuo"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dir, model, tokenizer): a sentencepiece tokenizer and a random tiny Llama with room for
    HuatuoGPT's long system prompt, loaded back from disk as the server loads it."""
    d = tiny_base(tmp_path_factory.mktemp(NAME), LINES, max_seq_len=1024).dir
    return d, Transformer.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)


def start(tiny, **kw):
    cfg = ServeConfig(model=tiny[0], port=0, template=TEMPLATE, served_model_name=NAME, log_requests=False, **kw)
    return make_server(cfg).start()


@pytest.fixture(scope="module")
def server(tiny):
    srv = start(tiny, batch_size=4, max_queue=8)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
    yield c
    c.close()


def user(text):
    return [{"role": "user", "content": text}]


def reference_chat(tiny, messages, max_tokens, stops=()):
    """(text, finish_reason, completion tokens or None if a stop string cut it) as the server must answer
    greedily: generate.generate on the rendered prompt, cut at the stop token or the first stop string;
    white space before the template's end (its stop token or stop strings) is dropped, not before the
    client's stop strings or at the length limit."""
    _, model, tok = tiny
    stop_ids = stop_token_ids(tok, TEMPLATE)
    out = generate(model, [render_prompt(messages, tok, TEMPLATE)], max_tokens, stop_ids=stop_ids)[0]
    finish = "stop" if out[-1] in stop_ids else "length"
    text = tok.decode(out[:-1] if finish == "stop" else out).rstrip("\ufffd")
    cut = cut_at_stop(text, list(stops) + stop_strings(TEMPLATE))
    if cut != text:
        at_end = cut_at_stop(text, list(stops)) != cut  # the template's stop string came first
        return cut.rstrip() if at_end else cut, "stop", None
    return text.rstrip() if finish == "stop" else text, finish, len(out)


def reference_completion(tiny, prompt, max_tokens):
    _, model, tok = tiny
    out = generate(model, [tok.encode(prompt, bos=tok.add_bos)], max_tokens, stop_ids=tok.stop_ids)[0]
    finish = "stop" if out[-1] in tok.stop_ids else "length"
    return tok.decode(out[:-1] if finish == "stop" else out).rstrip("\ufffd"), finish, len(out)


def http(server, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json",
                                                                        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, hdrs, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, e.headers, e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


# ----------------------------------------------------------------------------- the happy paths

def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    status, _, body = http(server, "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == NAME
    status, hdrs, page = http(server, "/")
    assert status == 200 and hdrs["Content-Type"].startswith("text/html")
    assert "不构成医疗建议" in page and "not medical advice" in page
    assert "src=\"http" not in page and "href=\"http" not in page  # nothing from a CDN


def test_chat_greedy_is_generate(tiny, client):
    msgs = user(QUESTIONS[0])
    want, finish, n_tokens = reference_chat(tiny, msgs, 24)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want and want
    assert r.choices[0].finish_reason == finish
    prompt_len = len(render_prompt(msgs, tiny[2], TEMPLATE))
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == n_tokens
    assert r.usage.total_tokens == prompt_len + n_tokens
    # a system message and earlier turns go through the model's template too
    msgs = [{"role": "system", "content": "你是医生"}, *user("头痛"), {"role": "assistant", "content": "多休息"},
            *user(QUESTIONS[1])]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == reference_chat(tiny, msgs, 12)[0]
    # max_completion_tokens is the newer name of max_tokens
    r = client.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_completion_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.content == reference_chat(tiny, user(QUESTIONS[0]), 5)[0]
    assert r.usage.completion_tokens <= 5


def test_a_conversation_s_next_turn_reuses_its_keys(tiny, client, server, monkeypatch):
    """The server's engine keeps a finished answer's keys (keep_prefixes): the next turn of the same
    conversation prefills only what it adds, its greedy answer is still generate's, and its usage
    counts the prompt tokens it did not compute as cached_tokens, streamed or not."""
    import nanohuatuo.engine as engine_mod
    assert server.service.runner.engine.keep_prefixes
    msgs = user(QUESTIONS[2])
    first = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    msgs = msgs + [{"role": "assistant", "content": first.choices[0].message.content}] + user(QUESTIONS[3])
    want = reference_chat(tiny, msgs, 10)[0]
    seen, forward = [], engine_mod.forward
    monkeypatch.setattr(engine_mod, "forward", lambda m, ids, *a: seen.append(ids.shape[1]) or forward(m, ids, *a))
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want
    full = len(render_prompt(msgs, tiny[2], TEMPLATE))
    assert len(seen) == 1 and seen[0] < full - len(render_prompt(user(QUESTIONS[2]), tiny[2], TEMPLATE))
    cached = full - 1 - seen[0]  # all but the last prompt token go through the prefill, less what was kept
    assert r.usage.prompt_tokens == full and r.usage.prompt_tokens_details.cached_tokens == cached
    # the same prompt again: every key but the last token's is kept; the stream's usage says so too
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens == full - 1


def test_the_models_own_chat_template(tmp_path):
    """--template auto (the default) renders prompts with the Jinja template the model ships."""
    d = tiny_base(tmp_path, LINES, max_seq_len=512).dir
    config = json.load(open(os.path.join(d, "tokenizer_config.json")))
    config["chat_template"] = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    json.dump(config, open(os.path.join(d, "tokenizer_config.json"), "w"))
    srv = make_server(ServeConfig(model=d, port=0, batch_size=1, log_requests=False)).start()
    try:
        model, tok = Transformer.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)
        template = resolve_template(d, "auto", tok=tok)
        assert template.is_jinja
        prompt = render_prompt(user("头痛怎么办？"), tok, template)
        assert tok.decode(prompt).endswith("user: 头痛怎么办？\nassistant:")
        out = generate(model, [prompt], 10, stop_ids=stop_token_ids(tok, template))[0]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
        r = c.chat.completions.create(model=os.path.basename(d), messages=user("头痛怎么办？"), max_tokens=10,
                                      temperature=0)
        assert r.usage.prompt_tokens == len(prompt)
        want = tok.decode([t for t in out if t not in stop_token_ids(tok, template)])
        assert r.choices[0].message.content == cut_at_stop(want, stop_strings(template)).rstrip()
        c.close()
    finally:
        srv.close()


def test_adapter_is_merged(tiny, tmp_path):
    """--adapter serves base + LoRA: the answer is the merged model's, not the base's."""
    d, base, tok = tiny
    model = Transformer.from_pretrained(d)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.5)  # a zero-initialised B would make the adapter a no-op
    save_adapter(model, tmp_path / "adapter")
    srv = start(tiny, batch_size=1, adapter=str(tmp_path / "adapter"))
    try:
        merged = Transformer.from_pretrained(d, adapter=str(tmp_path / "adapter"))
        merge_and_unload(merged)
        ids = render_prompt(user(QUESTIONS[0]), tok, TEMPLATE)
        stops = stop_token_ids(tok, TEMPLATE)
        want = generate(merged.eval(), [ids], 12, stop_ids=stops)[0]
        assert want != generate(base, [ids], 12, stop_ids=stops)[0]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_tokens=12, temperature=0)
        text = tok.decode([t for t in want if t not in stops])
        assert r.choices[0].message.content == cut_at_stop(text, stop_strings(TEMPLATE)).rstrip()
        c.close()
    finally:
        srv.close()
    # unnamed, a server of a merged adapter answers to the adapter's name, not the base's: two servers of one
    # base with different adapters must differ for a client whose reply cache keys on the name
    assert served_name(ServeConfig(model=d, adapter=str(tmp_path / "adapter"))) == "adapter"
    assert served_name(ServeConfig(model=d)) == os.path.basename(d)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised(tiny, quant):
    """--quant int8|nf4 serves the quantised model (answers close to, not equal to, float32)."""
    srv = start(tiny, batch_size=1, quant=quant)
    try:
        status, _, body = http(srv, "/v1/chat/completions", {"model": NAME, "messages": user(QUESTIONS[0]),
                                                             "max_tokens": 6, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        srv.close()


def test_chat_stream(tiny, client, server):
    msgs = user(QUESTIONS[0])
    want, finish, n_tokens = reference_chat(tiny, msgs, 24)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want and len(pieces) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "\ufffd" not in "".join(pieces[:-1])  # no half characters on the wire
    # the raw wire: events end with data: [DONE]
    status, hdrs, text = http(server, "/v1/chat/completions", {"model": NAME, "messages": msgs, "max_tokens": 4,
                                                               "stream": True})
    assert status == 200 and hdrs["Content-Type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in text.strip().split("\n\n")]
    assert events[-1] == "[DONE]" and all(json.loads(e)["choices"] for e in events[:-1])
    # no usage chunk unless asked for, but the last chunk still carries the counts
    assert json.loads(events[-2])["usage"]["completion_tokens"] == reference_chat(tiny, msgs, 4)[2]
    # an HTTP/1.0 client cannot read chunks: the same events, then the connection closes
    import socket
    body = json.dumps({"model": NAME, "messages": msgs, "max_tokens": 4, "stream": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = b"".join(iter(lambda: sock.recv(65536), b""))  # to the close
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and payload.decode().strip().split("\n\n")[-1] == "data: [DONE]"
    deltas = [json.loads(e[len("data: "):])["choices"][0]["delta"] for e in payload.decode().split("\n\n")[:-2]]
    assert "".join(d.get("content", "") for d in deltas) == reference_chat(tiny, msgs, 4)[0]


def test_completions(tiny, client):
    prompt = "头痛三天了"
    want, finish, n_tokens = reference_completion(tiny, prompt, 16)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(tiny[2].encode(prompt, bos=tiny[2].add_bos))
    assert r.usage.completion_tokens == n_tokens
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == n_tokens
    # several prompts (strings or token ids) -> one choice each, in order; echo puts the prompt first
    ids = tiny[2].encode("孩子咳嗽", bos=True)
    r = client.completions.create(model=NAME, prompt=[prompt, ids], max_tokens=8, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == tiny[2].decode(tiny[2].encode(prompt, bos=tiny[2].add_bos)) + \
        reference_completion(tiny, prompt, 8)[0]
    assert r.usage.prompt_tokens == len(tiny[2].encode(prompt, bos=tiny[2].add_bos)) + len(ids)


def test_n_samples_and_seed(client):
    kw = dict(model=NAME, messages=user(QUESTIONS[2]), max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert len(set(texts)) > 1  # the samples differ from each other
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in b.choices] == texts  # and the seed makes them repeatable
    assert a.usage.completion_tokens == b.usage.completion_tokens
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # the prompt counted once, not n times
    other = client.chat.completions.create(**{**kw, "seed": 99})
    assert [c.message.content for c in other.choices] != texts
    # streamed samples carry their index; the same seed gives the same texts
    got = ["", "", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
    assert got == texts


def test_stop_strings(tiny, client):
    full, _, _ = reference_chat(tiny, user(QUESTIONS[0]), 40)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full[:full.find(stop)]  # white space before the client's stop string is the answer's
    r = client.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_tokens=40, temperature=0,
                                       stop=[stop, "never appears"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40  # generation ended there, it was not just cut
    chunks = list(client.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_tokens=40,
                                                 temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    # completions too
    text, _, _ = reference_completion(tiny, "血压高", 30)
    stop = text[len(text) // 2:len(text) // 2 + 1]
    r = client.completions.create(model=NAME, prompt="血压高", max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs(tiny, client):
    _, model, tok = tiny
    msgs = user(QUESTIONS[3])
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = render_prompt(msgs, tok, TEMPLATE)
    out = generate(model, [ids], 10, stop_ids=stop_token_ids(tok, TEMPLATE))[0]
    out = [t for t in out if t not in stop_token_ids(tok, TEMPLATE)]
    assert len(content) == len(out)
    with torch.no_grad():  # the log-probs of a plain forward pass over prompt + answer
        logits = model(torch.tensor([ids + out]))[0, len(ids) - 1:-1].float()
    want = torch.log_softmax(logits, -1)
    for i, (entry, t) in enumerate(zip(content, out)):
        assert abs(entry.logprob - want[i, t].item()) < 1e-4
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy: the top one
        assert [x.logprob for x in entry.top_logprobs] == sorted((x.logprob for x in entry.top_logprobs),
                                                                reverse=True)
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content).startswith(
        r.choices[0].message.content[:1])
    # streamed, every token's entry arrives once
    streamed = []
    for chunk in client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    # the completions format: tokens, token_logprobs, top_logprobs, text_offset
    r = client.completions.create(model=NAME, prompt="头痛", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)


def test_eight_concurrent_streams(tiny, server):
    # 8 clients on 4 slots: half of them wait in the queue, each gets its own greedy answer
    want = [reference_chat(tiny, user(q), 20)[0] for q in QUESTIONS]
    got, errors = [None] * 8, []

    def one(i):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
            text = ""
            for chunk in c.chat.completions.create(model=NAME, messages=user(QUESTIONS[i]), max_tokens=20,
                                                   temperature=0, stream=True):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            got[i] = text
            c.close()
        except Exception as e:  # surfaced below: a thread's assertion would be lost
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert got == want


# ----------------------------------------------------------------------------- bad requests

BAD = [
    # (name, path, body (dict) or raw bytes, status, param)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("missing messages", "/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("message not an object", "/v1/chat/completions", {"model": NAME, "messages": ["hi"]}, 400, "messages[0]"),
    ("content wrong type", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]},
     400, "messages[0].content"),
    ("unknown role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "doctor", "content": "hi"}]},
     400, "messages[0].role"),
    ("tool role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "hi"}]},
     400, "messages[0].role"),
    ("turn order", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]},
     400, "messages"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4", "messages": user("hi")}, 404, "model"),
    ("temperature wrong type", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "temperature": "hot"},
     400, "temperature"),
    ("temperature out of range", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "temperature": 3},
     400, "temperature"),
    ("max_tokens negative", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": -1},
     400, "max_tokens"),
    ("max_tokens zero", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": 0},
     400, "max_tokens"),
    ("max_tokens a float", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": 2.5},
     400, "max_tokens"),
    ("max_tokens too large", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": 10**6},
     400, "max_tokens"),
    ("prompt beyond the context", "/v1/chat/completions", {"model": NAME, "messages": user("头痛" * 2000)},
     400, "messages"),
    ("n zero", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "n": 0}, 400, "n"),
    ("n too large", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "n": 99}, 400, "n"),
    ("stop wrong type", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "stop": 5}, 400, "stop"),
    ("stream wrong type", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "stream": "yes"},
     400, "stream"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": NAME, "messages": user("hi"), "top_logprobs": 2}, 400, "top_logprobs"),
    ("seed wrong type", "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "seed": "x"}, 400, "seed"),
    ("completion without prompt", "/v1/completions", {"model": NAME}, 400, "prompt"),
    ("completion prompt wrong type", "/v1/completions", {"model": NAME, "prompt": {"a": 1}}, 400, "prompt"),
    ("completion token id out of range", "/v1/completions", {"model": NAME, "prompt": [1, 10**6]}, 400, "prompt"),
    ("completion logprobs too many", "/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 9}, 400,
     "logprobs"),
    ("completion prompts x n beyond capacity", "/v1/completions", {"model": NAME, "prompt": ["a"] * 4, "n": 4},
     400, "n"),
    ("unknown route", "/v1/embeddings", {"model": NAME, "input": "hi"}, 404, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, _, answer = http(server, path, None if raw else body, raw=raw)
    assert got == status, answer
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert http(server, "/health")[0] == 200  # and the server keeps serving


def test_unsupported_method_answers_json(server):
    for method, status in (("PUT", 405), ("DELETE", 405), ("BREW", 501)):  # a method HTTP has, one it has not
        req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == status and json.loads(e.value.read())["error"]["message"]
        assert status == 501 or "HEAD" in e.value.headers["Allow"]
    # HEAD: GET's status and headers without the body (a load balancer's health check)
    for path in ("/health", "/v1/models", "/"):
        with urllib.request.urlopen(urllib.request.Request(server.url + path, method="HEAD"), timeout=30) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
    assert http(server, "/health")[0] == 200


def test_a_body_over_the_limit_gets_its_413(server):
    """The body is read before the answer: closed unread, the connection is reset and the client sees a broken
    pipe (the openai client retries it) instead of the 413."""
    from nanohuatuo.serve import MAX_BODY
    body = b'{"model": "x", "messages": [], "pad": "' + b"x" * MAX_BODY + b'"}'
    got, _, answer = http(server, "/v1/chat/completions", raw=body)
    assert got == 413 and f"at most {MAX_BODY} bytes" in answer["error"]["message"]
    assert http(server, "/health")[0] == 200


def test_bad_requests_through_the_client_and_unknown_fields(tiny, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=user("hi"))
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=user("头痛" * 2000))
    assert e.value.code == "context_length_exceeded"
    # fields the server does not know (or does not use) are ignored, as OpenAI does
    r = client.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_tokens=6, temperature=0,
                                       presence_penalty=0.0, user="someone",
                                       extra_body={"made_up_field": {"x": 1}})
    assert r.choices[0].message.content == reference_chat(tiny, user(QUESTIONS[0]), 6)[0]


# ----------------------------------------------------------------------------- load, drops, keys

def gate_engine(srv, delay=0.0):
    """Hold the engine's steps until the returned event is set (then slow each step by `delay`)."""
    gate = threading.Event()
    engine = srv.service.runner.engine
    step = engine.step

    def held():
        gate.wait()
        time.sleep(delay)
        return step()
    engine.step = held
    return gate


def test_full_queue_answers_429(tiny):
    srv = start(tiny, batch_size=1, max_queue=1)
    try:
        gate = gate_engine(srv)
        results = []

        def one():
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
            results.append(c.chat.completions.create(model=NAME, messages=user("头痛"), max_tokens=3,
                                                     temperature=0).choices[0].message.content)
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while srv.service.runner.in_flight < 2 and time.time() < deadline:
            time.sleep(0.01)
        status, hdrs, body = http(srv, "/v1/chat/completions", {"model": NAME, "messages": user("hi")})
        assert status == 429 and hdrs["Retry-After"] == "1" and body["error"]["code"] == "queue_full"
        gate.set()
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 2  # the two accepted requests were answered
        assert http(srv, "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": 2})[0] == 200
    finally:
        srv.close()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_dropped_request_frees_its_slot(tiny, stream):
    """A client that goes away mid-answer: a stream closed, or a whole answer's client timing out while
    tokens still come (the openai client's timeout, after which it retries: each retry would otherwise
    generate the answer again beside the abandoned one)."""
    srv = start(tiny, batch_size=1, max_queue=0)
    try:
        gate = gate_engine(srv, delay=0.01)  # ~100 tokens/s: 700 tokens would take seconds
        gate.set()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        ask = dict(model=NAME, messages=user("头痛"), max_tokens=700, temperature=1.0, seed=0,
                   extra_body={"ignore_eos": True})
        if stream:
            chunks, got = c.chat.completions.create(stream=True, **ask), 0
            for chunk in chunks:
                got += bool(chunk.choices and chunk.choices[0].delta.content)
                if got == 3:
                    break
            chunks.close()  # the client goes away mid-answer
        else:
            with pytest.raises(openai.APITimeoutError):
                c.with_options(timeout=0.5).chat.completions.create(**ask)
        deadline = time.time() + 10
        while srv.service.runner.in_flight and time.time() < deadline:
            time.sleep(0.02)
        health = http(srv, "/health")[2]
        assert health["in_flight"] == 0 and health["cancelled"] == 1
        # the one slot is free again: a new request is served, not refused with 429
        r = c.chat.completions.create(model=NAME, messages=user("头痛"), max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert not srv.service.runner.engine.has_work()
        c.close()
    finally:
        srv.close()


def test_failed_step_answers_500_and_serving_goes_on(tiny):
    srv = start(tiny, batch_size=2)
    try:
        engine = srv.service.runner.engine
        step = engine.step

        def broken():
            engine.step = step  # fail once
            raise RuntimeError("out of memory (simulated)")
        engine.step = broken
        status, _, body = http(srv, "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": 3})
        assert status == 500 and "out of memory (simulated)" in body["error"]["message"]
        assert body["error"]["type"] == "server_error"
        assert http(srv, "/v1/chat/completions", {"model": NAME, "messages": user("hi"), "max_tokens": 3})[0] == 200
        assert srv.service.runner.in_flight == 0
    finally:
        srv.close()


def test_api_key(tiny, monkeypatch):
    monkeypatch.setenv("NANOHUATUO_API_KEY", "from-env")
    srv = start(tiny, batch_size=1, api_key="sekrit")
    env_srv = start(tiny, batch_size=1)
    try:
        assert http(srv, "/health")[0] == 200  # no key needed
        assert http(srv, "/")[0] == 200  # the page asks for the key itself
        status, hdrs, body = http(srv, "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, _, _ = http(srv, "/v1/chat/completions", {"model": NAME, "messages": user("hi")},
                            headers={"Authorization": "Bearer wrong"})
        assert status == 401
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=2)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=2).choices
        # no --api-key: the environment variable holds it
        assert http(env_srv, "/v1/models")[0] == 401
        assert http(env_srv, "/v1/models", headers={"Authorization": "Bearer from-env"})[0] == 200
        bad.close()
        good.close()
    finally:
        srv.close()
        env_srv.close()


def test_cli_bad_input(tiny, server, capsys):
    """A wrong flag ends with one line and exit code 2, never a traceback."""
    for argv, words in ([["--model", os.path.join(tiny[0], "missing")], "no such directory"],
                        [["--model", tiny[0], "--template", "nonsense"], "unknown chat template"],
                        [["--model", tiny[0], "--port", str(server.port)], "cannot listen"],
                        [["--model", tiny[0], "--batch-size", "0"], "--batch-size"]):
        assert serve_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and "Traceback" not in err, err


def test_cli(tiny):
    """serve.py as a user runs it: prints where it listens, answers, stops on Ctrl-C."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("NANOHUATUO_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "serve.py", "--model", tiny[0], "--port", "0",
                             "--template", TEMPLATE, "--batch-size", "2"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
        base = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        c = openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        name = os.path.basename(tiny[0])  # the directory's name by default
        r = c.chat.completions.create(model=name, messages=user(QUESTIONS[0]), max_tokens=8, temperature=0)
        assert r.choices[0].message.content == reference_chat(tiny, user(QUESTIONS[0]), 8)[0]
        c.close()
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler prints every thread's stack on SIGABRT
            proc.send_signal(6)
            proc.wait(timeout=30)
            pytest.fail("serve.py did not stop within 30 s of Ctrl-C; its stderr:\n" + proc.stderr.read()[-8000:])
    assert code == 0, proc.stderr.read()[-8000:]
