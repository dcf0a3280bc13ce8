"""Sampling K answers per prompt: shape, seeding, stop strings, and the CLI chain
sampling -> offline judge -> train_rm.py on a tiny model."""

import json
import os

import pytest

from fake_openai import ScriptedServer, completion
from nanohuatuo import feedback, reward, sampling
from nanohuatuo.data import DataError
from nanohuatuo.engine import Event
from nanohuatuo.llm import LLM
from nanohuatuo.model import ModelConfig, Transformer
from nanohuatuo.templates import PromptTooLong, fit_prompt, render_prompt, stop_token_ids
from nanohuatuo.tokenizer import train_sentencepiece

TEXTS = ["User: 孩子发烧咳嗽怎么办", "Assistant:", "多喝水，注意休息，及时就医。", "头疼三天，晚上睡不着。"]
PROMPTS = [
    {"id": "a", "messages": [{"role": "user", "content": "孩子发烧咳嗽怎么办"}], "reference": "多喝水，及时就医。"},
    {"id": "b", "messages": [{"role": "user", "content": "头疼三天"}], "reference": "注意休息。"},
    {"id": "c", "messages": [{"role": "user", "content": "睡不着"}, {"role": "assistant", "content": "多久了？"},
                             {"role": "user", "content": "三天"}], "reference": "注意休息，及时就医。"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = train_sentencepiece(TEXTS, path, vocab_size=320)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, ffn_dim=64))
    model.init_weights(seed=0)
    model.save_pretrained(path)
    return str(path), model.eval(), tok


def test_k_answers_per_prompt_and_seeded(tiny):
    _, model, tok = tiny
    kw = dict(k=3, max_new_tokens=6, temperature=1.0, batch_size=4, seed=7)
    items = sampling.sample_answers(model, tok, "plain", PROMPTS, **kw)
    assert [it["id"] for it in items] == ["a", "b", "c"]
    assert items[2]["question"] == PROMPTS[2]["messages"] and items[2]["reference"] == PROMPTS[2]["reference"]
    assert all(len(it["answers"]) == 3 and all(isinstance(a, str) for a in it["answers"]) for it in items)
    assert len({a for it in items for a in it["answers"]}) > 3  # sampled, not one answer repeated
    assert sampling.sample_answers(model, tok, "plain", PROMPTS, **kw) == items
    assert sampling.sample_answers(model, tok, "plain", PROMPTS, **dict(kw, seed=8)) != items


class FakeEngine:
    """Engine stand-in: replays scripted (text, finish_reason) samples, one token per step."""
    script = []  # per add() call: k (text, reason) pairs
    made = []

    def __init__(self, model, tokenizer=None, slots=16, max_len=None, compile=False):
        self.tok, self.slots, self.max_len = tokenizer, slots, max_len
        self.adds, self.running, self.next_rid = [], {}, 0
        FakeEngine.made.append(self)

    def add(self, ids, params, n=1):
        self.adds.append((list(ids), params, n))
        rids = []
        for text, reason in self.script[len(self.adds) - 1]:
            tokens = self.tok.encode(text) + ([self.tok.eos_id] if reason == "stop" else [])
            self.running[self.next_rid] = (tokens, reason)
            rids.append(self.next_rid)
            self.next_rid += 1
        return rids if n > 1 else rids[0]

    def has_work(self):
        return bool(self.running)

    def step(self):
        events = []
        for rid, (tokens, reason) in list(self.running.items())[:self.slots]:
            last = len(tokens) == 1
            events.append(Event(rid, tokens[0], None, None, reason if last else None))
            self.running[rid] = (tokens[1:], reason)
            if last:
                del self.running[rid]
        return events


def test_engine_samples_k_per_prompt_with_finished_flags(tiny, monkeypatch):
    _, model, tok = tiny
    FakeEngine.made, FakeEngine.script = [], [
        [("多喝水。\nUser: 还有", "stop"), ("注意休息", "length"), ("及时就医。", "stop")],  # stop string, cut, EOS
        [("好的", "stop"), ("好的", "stop"), ("头疼要注意", "length")],
    ]
    monkeypatch.setattr(sampling, "Engine", FakeEngine)
    items = sampling.sample_answers(model, tok, "plain", PROMPTS[:2], k=3, seed=0, batch_size=4)
    assert items[0]["answers"] == ["多喝水。", "注意休息", "及时就医。"]
    assert items[0]["finished"] == [True, False, True] and items[1]["finished"] == [True, True, False]
    [eng] = FakeEngine.made
    assert eng.slots == 4 and [n for _, _, n in eng.adds] == [3, 3]  # one add per prompt, n = k
    ids, params, _ = eng.adds[0]
    assert ids == render_prompt(PROMPTS[0]["messages"], tok, "plain")
    assert params.stop_strings == ("\nUser:",) and set(params.stop_ids) == stop_token_ids(tok, "plain")
    assert params.temperature == 0.7 and params.max_new_tokens == 256
    # a prompt's seed depends on the run's seed and its id only
    assert params.seed == sampling.prompt_seed(0, "a") != eng.adds[1][1].seed


def test_answers_do_not_depend_on_batch_size(tiny):
    _, model, tok = tiny
    kw = dict(k=2, max_new_tokens=5, temperature=1.0, seed=3)
    a = sampling.sample_answers(model, tok, "plain", PROMPTS, batch_size=2, **kw)
    b = sampling.sample_answers(model, tok, "plain", PROMPTS[::-1], batch_size=8, **kw)
    assert a == b[::-1]
    assert all(len(it["finished"]) == 2 for it in a)


def test_long_prompt_loses_old_turns_or_is_skipped(tiny, capsys):
    _, model, tok = tiny
    long_turns = [{"role": "user", "content": "头疼三天，晚上睡不着。" * 20},
                  {"role": "assistant", "content": "多久了？" * 20}, {"role": "user", "content": "三天"}]
    full = len(render_prompt(long_turns, tok, "plain"))
    assert fit_prompt(long_turns, tok, "plain", full - 1) == render_prompt(long_turns[2:], tok, "plain")
    with pytest.raises(PromptTooLong):
        fit_prompt(long_turns[:1], tok, "plain", 10)
    prompts = [dict(PROMPTS[0], id="long", messages=long_turns[:1]), PROMPTS[1]]
    items = sampling.sample_answers(model, tok, "plain", prompts, k=2, max_new_tokens=4, context=40)
    assert [it["id"] for it in items] == ["b"]
    assert "skipped 1 prompts" in capsys.readouterr().out


def test_endpoint_sampling_n_k_finish_reasons_and_top_up(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    def handler(req, path):
        question = req["messages"][-1]["content"]
        if question == "头疼三天":  # a server that ignores n: one choice per request
            return completion(f"答{req['seed'] % 7}", req)
        if question == "三天":
            return {"choices": []}  # never usable: the prompt is skipped
        return completion(["多喝水", "及时就医", "注意休"], req, finish_reason=["stop", "stop", "length"])

    with ScriptedServer(handler) as srv, LLM(srv.base_url, "m", cache=tmp_path / "c.sqlite", attempts=2) as llm:
        items = sampling.sample_from_endpoint(llm, PROMPTS, k=3, max_new_tokens=9, temperature=0.9, seed=1)
        assert [it["id"] for it in items] == ["a", "b"]
        assert items[0]["answers"] == ["多喝水", "及时就医", "注意休"] and items[0]["finished"] == [True, True, False]
        assert len(items[1]["answers"]) == 3 and items[1]["finished"] == [True] * 3
        bodies = [body for _, body in srv.requests]
        [first] = [b for b in bodies if b["messages"][-1]["content"] == PROMPTS[0]["messages"][-1]["content"]]
        assert (first["n"], first["max_tokens"], first["temperature"], first["seed"]) == (
            3, 9, 0.9, sampling.prompt_seed(1, "a"))
        assert "top_k" not in first and llm.usage.unusable == {"empty choices": 1}
        top_ups = [b for b in bodies if b["messages"][-1]["content"] == "头疼三天" and b["n"] == 1]
        assert len(top_ups) == 2 and len({b["seed"] for b in top_ups}) == 2  # two single requests make up 3


def test_cli_endpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PROMPTS[:2]), encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    with ScriptedServer(lambda req, path: completion(["甲", "乙"], req, finish_reason=["stop", "length"])) as srv:
        args = ["--base-url", srv.base_url, "--model-name", "m", "--data", str(prompts), "--out", str(out),
                "--k", "2", "--top-k", "20", "--cache", str(tmp_path / "c.sqlite")]
        assert sampling.main(args) == 0
        items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [(it["answers"], it["finished"]) for it in items] == [(["甲", "乙"], [True, False])] * 2
        assert srv.requests[0][1]["top_k"] == 20  # sent as an extra body field
        assert "sampling: 2 requests (0 cached)" in capsys.readouterr().out
    assert sampling.main(["--data", str(prompts), "--out", str(out)]) == 2
    assert "either --model" in capsys.readouterr().err


def test_cli_sample_rank_train(tiny, tmp_path):
    path, _, _ = tiny
    rows = [PROMPTS[0], PROMPTS[1], {"id": "conv", "source": "x", "messages": PROMPTS[2]["messages"] + [
        {"role": "assistant", "content": PROMPTS[2]["reference"]}]}]  # a prompt record and a conversation
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    samples, prefs = tmp_path / "samples.jsonl", tmp_path / "prefs.jsonl"
    args = ["--model", path, "--data", str(prompts), "--out", str(samples), "--k", "3", "--max-new-tokens", "6",
            "--template", "plain", "--temperature", "1.0", "--device", "cpu"]
    assert sampling.main(args + ["--limit", "2"]) == 0
    assert [json.loads(line)["id"] for line in samples.read_text().splitlines()] == ["a", "b"]
    assert sampling.main(args) == 0  # resumes: only the missing prompt is sampled
    items = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    assert [it["id"] for it in items] == ["a", "b", "conv"]
    assert items[2]["reference"] == PROMPTS[2]["reference"] and len(items[2]["answers"]) == 3

    assert all(len(it["finished"]) == 3 for it in items)
    # a random tiny model rarely ends an answer within 6 tokens: rank the cut ones last instead of dropping them
    assert feedback.main(["rank", "--data", str(samples), "--out", str(prefs), "--judge", "offline",
                          "--truncated", "last"]) == 0
    out = tmp_path / "rm"
    # in-process (train_rm.py only calls reward.main): no second torch start-up
    assert reward.main(["--model", path, "--data", str(prefs), "--out", str(out), "--template", "plain",
                        "--max-steps", "1", "--eval-frac", "0", "--device", "cpu"]) == 0
    rc = json.loads((out / "reward_config.json").read_text())  # written last: the RM is complete
    assert rc["lora"] is True and rc["base"] == os.path.abspath(path)


def test_bad_prompt_file_names_the_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"question": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: expected a prompt record"):
        sampling.read_prompts(bad)


def test_ctrl_c_writes_what_was_answered(tmp_path, monkeypatch):
    """Answers are saved every 30 s; Ctrl-C writes the ones since before leaving, so a rerun does not redo them."""
    from nanohuatuo import sampling as S
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"问题{i}"}],
                                           "reference": "多休息"}, ensure_ascii=False) + "\n" for i in range(3)),
                       encoding="utf-8")

    def interrupted(cfg, todo, save):
        save([{"id": todo[0]["id"], "answers": ["甲", "乙"]}])
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_sample", interrupted)
    out = tmp_path / "samples.jsonl"
    with pytest.raises(KeyboardInterrupt):
        S.run(S.SampleConfig(model="unused", data=str(prompts), out=str(out)))
    assert [row["id"] for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())] == ["p0"]
