"""Sampling K answers per prompt: shape, seeding, stop strings, and the CLI chain
sampling -> offline judge -> train_rm.py on a tiny model."""

import json
import os
import subprocess
import sys

import pytest

from nanohuatuo import feedback, sampling
from nanohuatuo.data import DataError
from nanohuatuo.generate import Generation
from nanohuatuo.model import ModelConfig, Transformer
from nanohuatuo.templates import stop_token_ids
from nanohuatuo.tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_answers_are_cut_at_stop_strings(tiny, monkeypatch):
    _, model, tok = tiny
    calls = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        calls.append((prompts, kw))
        texts = ["多喝水。\nUser: 还有", "注意休息", "及时就医。"]  # a stop string, a cut-off answer, an end token
        tokens = [tok.encode(t) for t in texts] + [[]] * (len(prompts) - 3)
        tokens[2].append(tok.eos_id)
        return Generation(tokens=tokens, logprobs=None, finished=[True, False, True] + [True] * (len(prompts) - 3))

    monkeypatch.setattr(sampling, "generate_batch", fake_generate)
    items = sampling.sample_answers(model, tok, "plain", PROMPTS[:1], k=3, seed=0)
    assert items[0]["answers"] == ["多喝水。", "注意休息", "及时就医。"]
    prompts, kw = calls[0]
    assert len(prompts) == 3 and prompts[0] == prompts[1] == prompts[2]  # the prompt repeated k times
    assert kw["stop_strings"] == ["\nUser:"] and set(kw["stop_ids"]) == stop_token_ids(tok, "plain")
    assert kw["temperature"] == 0.7 and kw["pad_id"] == tok.pad_id


def test_cli_sample_rank_train(tiny, tmp_path):
    path, _, _ = tiny
    rows = [PROMPTS[0], PROMPTS[1], {"id": "conv", "source": "x", "messages": PROMPTS[2]["messages"] + [
        {"role": "assistant", "content": PROMPTS[2]["reference"]}]}]  # a prompt record and a conversation
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    samples, prefs = tmp_path / "samples.jsonl", tmp_path / "prefs.jsonl"
    args = ["--model", path, "--prompts", str(prompts), "--out", str(samples), "--k", "3", "--max-new-tokens", "6",
            "--template", "plain", "--temperature", "1.0", "--device", "cpu"]
    assert sampling.main(args + ["--limit", "2"]) == 0
    assert [json.loads(line)["id"] for line in samples.read_text().splitlines()] == ["a", "b"]
    assert sampling.main(args) == 0  # resumes: only the missing prompt is sampled
    items = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    assert [it["id"] for it in items] == ["a", "b", "conv"]
    assert items[2]["reference"] == PROMPTS[2]["reference"] and len(items[2]["answers"]) == 3

    assert feedback.main(["rank", "--in", str(samples), "--out", str(prefs), "--judge", "offline"]) == 0
    out = tmp_path / "rm"
    run = subprocess.run([sys.executable, "train_rm.py", "--base", path, "--data", str(prefs), "--out", str(out),
                          "--template", "plain", "--max-steps", "1", "--eval-frac", "0", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "step 1/1" in run.stdout
    rc = json.loads((out / "reward_config.json").read_text())
    assert rc["lora"] is True and rc["base"] == os.path.abspath(path)


def test_bad_prompt_file_names_the_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"question": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: expected a prompt record"):
        sampling.read_prompts(bad)
