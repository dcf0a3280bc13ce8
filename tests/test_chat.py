"""chat.py: one-shot and interactive modes on a tiny model with its own tokenizer."""

import subprocess
import sys
import os

import pytest
import torch

from nanohuatuo import ModelConfig, Transformer, Tokenizer
from nanohuatuo import chat
from nanohuatuo.chat import reply
from nanohuatuo.generate import load_for_inference
from nanohuatuo.generate import generate
from nanohuatuo.templates import PromptTooLong, fit_prompt, render_prompt
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
                                n_kv_heads=2, ffn_dim=64, max_seq_len=512))
    m.init_weights(seed=0)
    m.save_pretrained(d)
    return str(d)


def test_one_shot_reply_is_greedy_generation(tiny_dir):
    model, tok, template = load_for_inference(tiny_dir, template="huatuo")
    msgs = [{"role": "user", "content": "头痛怎么办？"}]
    text = reply(model, tok, template, msgs, max_new_tokens=20, temperature=0.0)
    ids = render_prompt(msgs, tok, template)
    want = generate(model, [ids], 20, stop_ids=[tok.eos_id])[0]
    assert text == tok.decode(want).split("<病人>")[0].rstrip()
    streamed = []
    assert reply(model, tok, template, msgs, max_new_tokens=20, temperature=0.0, on_text=streamed.append) == text
    assert "".join(streamed) == text


def test_fit_prompt_keeps_system_and_latest(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "系统"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"问题{i}" * 5}, {"role": "assistant", "content": f"回答{i}" * 5}]
    msgs.append({"role": "user", "content": "最后的问题"})
    full = len(render_prompt(msgs, tok, "huatuo"))
    ids = fit_prompt(msgs, tok, "huatuo", full - 1)
    assert ids == render_prompt(msgs[:1] + msgs[3:], tok, "huatuo") and len(ids) <= full - 1
    last = render_prompt([msgs[0], msgs[-1]], tok, "huatuo")
    assert fit_prompt(msgs, tok, "huatuo", len(last)) == last


def test_cli_one_shot_and_interactive(tiny_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "chat.py", "--model", tiny_dir, "--prompt", "头痛怎么办？",
                          "--max-new-tokens", "8", "--temperature", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model, tok, template = load_for_inference(tiny_dir)
    want = reply(model, tok, template, [{"role": "user", "content": "头痛怎么办？"}], max_new_tokens=8,
                 temperature=0.0)
    assert out.stdout.strip() == want.strip()  # one-shot: stdout is the answer alone
    session = "/system 你是医生\n头痛怎么办？\n/reset\n咳嗽怎么办？\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "nanohuatuo.chat", "--model", tiny_dir, "--max-new-tokens", "5"],
                         cwd=ROOT, env=env, input=session, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "system message set" in out.stdout and "history cleared" in out.stdout
    assert out.stdout.count("助手>") == 2


# ----------------------------------------------------------------------------- the prompt budget

def _history(n, system=True):
    msgs = [{"role": "system", "content": "你是一名医生，请认真回答。"}] if system else []
    for i in range(n):
        msgs += [{"role": "user", "content": f"问题{i}" * 5}, {"role": "assistant", "content": f"回答{i}" * 5}]
    return msgs + [{"role": "user", "content": "最后的问题"}]


def test_budget_keeps_system_and_question_and_drops_whole_turns(tiny_dir, monkeypatch):
    model, tok, _ = load_for_inference(tiny_dir, template="huatuo")
    msgs = _history(6)
    full = render_prompt(msgs, tok, "huatuo")
    last = render_prompt([msgs[0], msgs[-1]], tok, "huatuo")
    max_new = model.config.max_seq_len - (len(full) + len(last)) // 2  # room for some turns, not all
    fed = []
    monkeypatch.setattr(chat, "stream", lambda m, ids, *a, **k: fed.append(ids) or iter(()))
    reply(model, tok, "huatuo", msgs, max_new_tokens=max_new, temperature=0.0, context=10_000)  # capped at 512
    budget = model.config.max_seq_len - max_new
    ids = fed[-1]
    assert len(last) < len(ids) <= budget < len(full)
    # whole turns dropped, oldest first, nothing cut mid-turn
    kept = next(msgs[:1] + msgs[k:] for k in range(1, len(msgs), 2)
                if len(render_prompt(msgs[:1] + msgs[k:], tok, "huatuo")) <= budget)
    assert ids == render_prompt(kept, tok, "huatuo") == fit_prompt(msgs, tok, "huatuo", budget)


def test_budget_refuses_what_cannot_fit(tiny_dir):
    model, tok, _ = load_for_inference(tiny_dir, template="huatuo")
    msgs = _history(2)
    with pytest.raises(ValueError, match=r"--max-new-tokens 1024 leaves no room for a prompt in a 512-token context"):
        reply(model, tok, "huatuo", msgs, max_new_tokens=1024, context=1024)
    last = len(render_prompt([msgs[0], msgs[-1]], tok, "huatuo"))
    with pytest.raises(PromptTooLong, match=rf"the question with the system message is {last} tokens, but only "
                                            rf"{last - 1} of the context"):
        reply(model, tok, "huatuo", msgs, max_new_tokens=512 - (last - 1), context=512)


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(tiny_dir, monkeypatch, capsys):
    lines = iter(["第一个问题", "第二个问题", "第三个问题"])
    seen = []

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt  # Ctrl-C at the input prompt: leave cleanly
    calls = iter(["interrupt", "silent", "answer"])

    def fake_reply(model, tok, template, messages, on_text=None, seed=None, **gen):
        seen.append(([dict(m) for m in messages], seed))
        what = next(calls)
        if what == "answer":
            on_text("好的")
            return "好的"
        if what == "interrupt":
            on_text("部分回答")
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(chat, "reply", fake_reply)
    chat.repl(None, None, "huatuo", seed=7)
    out = capsys.readouterr().out
    assert out.count("(answer stopped)") == 2
    # the stopped answer stays as the assistant's turn; a stop before any text drops the question
    assert seen[1][0] == [{"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": "部分回答"},
                          {"role": "user", "content": "第二个问题"}]
    assert seen[2][0] == seen[1][0][:2] + [{"role": "user", "content": "第三个问题"}]
    assert [s for _, s in seen] == [7, 7, 7]  # stopped answers don't count: the next one samples afresh


def test_int8_chat_and_lora_refused(tiny_dir):
    from nanohuatuo.lora import apply_lora
    from nanohuatuo.quant import Int8Linear, quantize_int8
    model, tok, _ = load_for_inference(tiny_dir, template="huatuo", quant="int8")
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(reply(model, tok, "huatuo", [{"role": "user", "content": "头痛怎么办？"}], max_new_tokens=4,
                            temperature=0.0), str)
    lora = Transformer.from_pretrained(tiny_dir)
    apply_lora(lora, r=2)
    with pytest.raises(ValueError, match="merge the LoRA adapter first"):
        quantize_int8(lora)


def test_quant_flag_int8_nf4_and_the_earlier_int8(tiny_dir, capsys):
    from nanohuatuo.chat import ChatConfig
    from nanohuatuo.cli import parse_config
    from nanohuatuo.generate import inference_quant
    from nanohuatuo.quant import NF4Linear
    model, tok, _ = load_for_inference(tiny_dir, template="huatuo", quant="nf4")
    assert isinstance(model.layers[0].self_attn.q_proj, NF4Linear)
    assert isinstance(reply(model, tok, "huatuo", [{"role": "user", "content": "头痛怎么办？"}], max_new_tokens=4,
                            temperature=0.0), str)
    with pytest.raises(ValueError, match="--quant fp4: use one of none, int8, nf4"):
        load_for_inference(tiny_dir, quant="fp4")
    # --int8, hidden, is --quant int8 for one release
    cfg = parse_config(ChatConfig, ["--model", tiny_dir, "--int8"])
    assert inference_quant(cfg.quant, cfg.int8) == "int8"
    assert capsys.readouterr().err == ("warning: --int8 is deprecated and will be removed in the next release; "
                                       "use --quant int8\n")
    assert inference_quant(parse_config(ChatConfig, ["--quant", "nf4"]).quant) == "nf4"
    with pytest.raises(ValueError, match="contradicts"):
        inference_quant("nf4", True)


def test_a_session_engine_prefills_only_what_each_turn_adds(tiny_dir, monkeypatch):
    """chat_engine keeps each answer's keys: turn 2's prompt (turn 1's conversation plus a question)
    is prefilled from where the held tokens stop, and both answers are those of a fresh engine."""
    import nanohuatuo.engine as engine_mod
    model, tok, template = load_for_inference(tiny_dir, template="huatuo")
    eng = chat.chat_engine(model, context=512)
    msgs = [{"role": "user", "content": "头痛怎么办？"}]
    first = reply(model, tok, template, msgs, max_new_tokens=12, temperature=0.0, engine=eng)
    assert first == reply(model, tok, template, msgs, max_new_tokens=12, temperature=0.0)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "孩子咳嗽有痰怎么办？"}]
    want = reply(model, tok, template, msgs, max_new_tokens=12, temperature=0.0)
    seen, forward = [], engine_mod.forward
    monkeypatch.setattr(engine_mod, "forward", lambda m, ids, *a: seen.append(ids.shape[1]) or forward(m, ids, *a))
    assert reply(model, tok, template, msgs, max_new_tokens=12, temperature=0.0, engine=eng) == want
    turn1, turn2 = render_prompt(msgs[:1], tok, template), render_prompt(msgs, tok, template)
    assert len(seen) == 1 and seen[0] <= len(turn2) - len(turn1)
