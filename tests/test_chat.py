"""chat.py: one-shot and interactive modes on a tiny model with its own tokenizer."""

import subprocess
import sys
import os

import pytest
import torch

from nanohuatuo import ModelConfig, Transformer, Tokenizer
from nanohuatuo.chat import load_for_chat, reply, trim_history
from nanohuatuo.generate import generate
from nanohuatuo.templates import render_prompt
from nanohuatuo.tokenizer import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = ["头痛三天了，伴有低烧，需要吃什么药？", "建议多休息，多喝水，体温超过38.5度可以服用退烧药。",
         "孩子咳嗽有痰怎么办？", "可以先观察，注意保暖，如果持续加重请及时就医。", "血压高需要注意什么？",
         "少盐少油，规律作息，按时服药，定期复查。"] * 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatmodel")
    tok = train_sentencepiece(LINES, d, vocab_size=320)
    m = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, ffn_dim=64, max_seq_len=256))
    m.init_weights(seed=0)
    m.save_pretrained(d)
    return str(d)


def test_one_shot_reply_is_greedy_generation(tiny_dir):
    model, tok, template = load_for_chat(tiny_dir, template="huatuo")
    msgs = [{"role": "user", "content": "头痛怎么办？"}]
    text = reply(model, tok, template, msgs, max_new_tokens=20, temperature=0.0)
    ids = render_prompt(msgs, tok, template)
    want = generate(model, [ids], 20, stop_ids=[tok.eos_id])[0]
    assert text == tok.decode(want).split("<病人>")[0].rstrip()
    streamed = []
    assert reply(model, tok, template, msgs, max_new_tokens=20, temperature=0.0, on_text=streamed.append) == text
    assert "".join(streamed) == text


def test_trim_history_keeps_system_and_latest(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "系统"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"问题{i}" * 5}, {"role": "assistant", "content": f"回答{i}" * 5}]
    msgs.append({"role": "user", "content": "最后的问题"})
    full = len(render_prompt(msgs, tok, "huatuo"))
    kept = trim_history(msgs, tok, "huatuo", full - 1)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and len(kept) == len(msgs) - 2
    assert len(render_prompt(kept, tok, "huatuo")) <= full - 1
    assert trim_history(msgs, tok, "huatuo", 1) == [msgs[0], msgs[-1]]


def test_cli_one_shot_and_interactive(tiny_dir):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "chat.py", "--model", tiny_dir, "--prompt", "头痛怎么办？",
                          "--max-new-tokens", "8", "--temperature", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model, tok, template = load_for_chat(tiny_dir)
    want = reply(model, tok, template, [{"role": "user", "content": "头痛怎么办？"}], max_new_tokens=8,
                 temperature=0.0)
    assert out.stdout.strip() == want.strip()
    session = "/system 你是医生\n头痛怎么办？\n/reset\n咳嗽怎么办？\n/exit\n"
    out = subprocess.run([sys.executable, "chat.py", "--model", tiny_dir, "--max-new-tokens", "5"], cwd=ROOT,
                         env=env, input=session, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "system message set" in out.stdout and "history cleared" in out.stdout
    assert out.stdout.count("助手>") == 2
