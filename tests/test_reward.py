"""Reward model: the pairwise loss by hand, last-token reads, learning a synthetic preference,
save/load round trips (LoRA, full, with an SFT adapter), the bias, and a released-layout directory."""

import json
import math
import os
import random
import re

import pytest
import torch

from conftest import tiny_base, write_jsonl
from nanohuatuo import reward
from nanohuatuo.data import DataError
from nanohuatuo.lora import apply_lora, lora_modules, save_adapter
from nanohuatuo.model import ModelConfig, Transformer
from nanohuatuo.templates import render

FILL = ["多喝水", "注意休息", "清淡饮食", "按时吃药", "测量体温", "保持睡眠", "适当运动", "观察症状"]
MARK = "及时就医"  # the synthetic preference: more of these is better
QUESTIONS = ["头疼三天怎么办", "孩子发烧咳嗽", "胃痛吃什么药", "血压偏高要注意什么", "失眠多梦怎么调理"]


def rm_base(path, value_head=False, lm_head=True):
    """A tiny Llama-style model with a sentencepiece tokenizer in one directory."""
    texts = FILL + [MARK] + QUESTIONS + [f"User: {q}" for q in QUESTIONS] + ["Assistant:"]
    return tiny_base(path, texts, lm_head=lm_head, value_head=value_head)


def preferences(n, seed=0):
    """Records with 3 answers of 4 phrases holding 2, 1 and 0 markers: best first."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answers = []
        for marks in (2, 1, 0):
            words = [rng.choice(FILL) for _ in range(4 - marks)] + [MARK] * marks
            rng.shuffle(words)
            answers.append("，".join(words) + "。")
        rows.append({"id": f"p{i}", "prompt": rng.choice(QUESTIONS), "reference": "及时就医，多喝水。",
                     "answers": answers})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return rm_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A LoRA reward model trained on the marker preference; bias and gain from separate SFT samples."""
    path, _, _ = base
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "prefs.jsonl", preferences(200))
    samples = [{"id": f"s{i}", "question": r["prompt"], "reference": "x", "answers": r["answers"]}
               for i, r in enumerate(preferences(20, seed=1))]
    norm = write_jsonl(tmp / "samples.jsonl", samples)
    cfg = reward.RMConfig(model=path, data=[data], out=str(tmp / "out"), template="plain", lora_r=8, lr=3e-3,
                          eval_frac=0.2, eval_every=20, norm_samples=norm, normalize_std=True, seed=0, device="cpu")
    return cfg, reward.train(cfg), samples


# ----------------------------------------------------------------------------- loss and forward

def _nls(d):
    return math.log1p(math.exp(-d))  # -logsigmoid(d)


def test_pairwise_loss_by_hand():
    r = torch.tensor([1.0, 0.2, -0.5])
    want = (_nls(0.8) + _nls(1.5) + _nls(0.7)) / 3
    assert reward.pairwise_loss(r, [0, 1, 2]).item() == pytest.approx(want, abs=1e-6)
    assert reward.pairwise_loss(r).item() == pytest.approx(want, abs=1e-6)
    # ranking 2 > 0 > 1: pairs (-0.5, 1.0), (-0.5, 0.2), (1.0, 0.2)
    want = (_nls(-1.5) + _nls(-0.7) + _nls(0.8)) / 3
    assert reward.pairwise_loss(r, [2, 0, 1]).item() == pytest.approx(want, abs=1e-6)
    center = ((1.2 ** 2) + (0.5 ** 2) + (0.3 ** 2)) / 3
    got = reward.pairwise_loss(r, [0, 1, 2], center_coef=0.01).item()
    assert got == pytest.approx((_nls(0.8) + _nls(1.5) + _nls(0.7)) / 3 + 0.01 * center, abs=1e-6)
    assert reward.pairwise_accuracy(r, [0, 1, 2]) == (3, 3)
    assert reward.pairwise_accuracy(r, [2, 0, 1]) == (1, 3)


def test_lr_schedule_warms_up_and_anneals_to_zero():
    f = [reward.lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(f[1:], f[2:])) and f[-1] < 0.05
    assert reward.lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_rm_forward_reads_last_real_token(base):
    _, _, model = base
    model = Transformer(ModelConfig(**{**model.config.to_dict(), "value_head": True})).eval()
    model.init_weights(seed=1)
    seqs = [[1, 40, 41, 42, 43, 44, 2], [1, 50, 51, 2], [1, 60, 2]]
    ids, mask = reward.right_pad(seqs, pad_id=3)
    assert ids[2].tolist() == [1, 60, 2, 3, 3, 3, 3] and mask[2].tolist() == [1, 1, 1, 0, 0, 0, 0]
    with torch.no_grad():
        got = reward.rm_forward(model, ids, mask)
        direct = model.values(model.hidden_states(ids, attention_mask=mask))  # (B, T)
        alone = [model.values(model.hidden_states(torch.tensor([s])))[0, -1] for s in seqs]
    torch.testing.assert_close(got, direct[torch.arange(3), torch.tensor([6, 3, 2])], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, torch.stack(alone), atol=1e-5, rtol=0)
    # left truncation keeps the end, where the score is read
    ids, mask = reward.right_pad(seqs, pad_id=3, max_len=4)
    assert ids[0].tolist() == [42, 43, 44, 2]
    with pytest.raises(ValueError, match="right padding"):
        reward.rm_forward(model, ids.flip(1), mask.flip(1))


# ----------------------------------------------------------------------------- training

def test_learns_synthetic_preference(trained):
    cfg, result, _ = trained
    assert result["eval_accuracy"] >= 0.9 and result["eval_pairs"] == 40 * 3
    assert result["steps"] == 40 and result["train_loss"] < 0.3
    rows = [json.loads(line) for line in open(f"{cfg.out}/metrics.jsonl")]
    assert sum("eval_accuracy" in r for r in rows) == 2  # at step 20 and at the end
    rc = json.load(open(f"{cfg.out}/reward_config.json"))
    assert rc["lora"] is True and rc["template"] == "plain" and rc["max_len"] == 1024
    assert rc["bias"] == pytest.approx(result["bias"]) and rc["gain"] == pytest.approx(1 / result["score_std"])
    with open(f"{cfg.out}/metrics.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_bias_and_gain_normalise_the_sft_samples(trained):
    cfg, _, samples = trained
    rm = reward.load_reward_model(cfg.out, device="cpu")
    questions = [s["question"] for s in samples for _ in s["answers"]]
    scores = reward.score_texts(rm, questions, [a for s in samples for a in s["answers"]])
    assert scores.dtype == torch.float32 and scores.shape == (60,)
    assert abs(scores.mean().item()) < 1e-4
    assert scores.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    # and the preference still holds after normalisation: 2 markers > 1 > 0 on average
    by_rank = scores.view(20, 3).mean(0)
    assert by_rank[0] > by_rank[1] > by_rank[2]


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("mode", ["lora", "lora+sft", "full"])
def test_save_load_round_trip(base, tmp_path, mode):
    path, tok, _ = base
    sft = None
    if mode == "lora+sft":  # an SFT adapter that really changes the weights
        sft_model = Transformer.from_pretrained(path)
        apply_lora(sft_model, r=4, alpha=8)
        _perturb(sft_model, seed=5)
        sft = str(tmp_path / "sft")
        save_adapter(sft_model, sft)
    cfg = reward.RMConfig(model=path, data=["unused"], out=str(tmp_path / "rm"), adapter=sft, template="plain",
                          lora_r=0 if mode == "full" else 8, max_len=20, device="cpu")
    model, _, _ = reward.build_model(cfg, torch.device("cpu"), torch.float32)
    _perturb(model, seed=6)
    with torch.no_grad():
        model.value_head.bias.fill_(0.3)
        if mode == "full":
            model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.eval()
    rows = preferences(2)
    messages = [[{"role": "user", "content": r["prompt"]}] for r in rows for _ in r["answers"]]
    answers = [a for r in rows for a in r["answers"]]
    seqs = [render(m + [{"role": "assistant", "content": a}], tok, "plain")[0] for m, a in zip(messages, answers)]
    assert max(map(len, seqs)) > 20  # so left truncation to max_len is exercised too
    with torch.no_grad():
        want = reward.rm_forward(model, *reward.right_pad(seqs, tok.pad_id, max_len=20)) - 0.25
    reward.save_reward_model(model, cfg, "plain", bias=0.25, gain=1.0, score_std=1.0, eval_accuracy=0.5, tok=tok)
    if mode == "full":  # its own model directory: its template is written before reward_config.json, the mark
        assert os.stat(os.path.join(cfg.out, "chat_template.jinja")).st_mtime_ns <= \
            os.stat(os.path.join(cfg.out, "reward_config.json")).st_mtime_ns
    rm = reward.load_reward_model(cfg.out, device="cpu")
    assert rm.model.lm_head is None and not any(p.requires_grad for p in rm.model.parameters())
    assert (rm.template.spec, rm.bias, rm.gain, rm.max_len) == ("plain", 0.25, 1.0, 20)
    torch.testing.assert_close(reward.score_texts(rm, messages, answers), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward.score_ids(rm, seqs, batch_size=2), want, atol=1e-5, rtol=0)
    rc = json.load(open(tmp_path / "rm" / "reward_config.json"))
    assert rc["sft_adapter"] == (sft and str(tmp_path / "sft"))
    if mode == "full":
        assert json.load(open(tmp_path / "rm" / "config.json"))["architectures"] == ["LlamaRewardModel"]


def test_released_reward_model_layout_loads(tmp_path):
    path, tok, model = rm_base(tmp_path / "HuatuoGPT-reward-model-tiny", value_head=True, lm_head=False)
    assert json.load(open(f"{path}/config.json"))["architectures"] == ["LlamaRewardModel"]
    rm = reward.load_reward_model(path, device="cpu")  # no chat template of its own: HuatuoGPT's, with a line
    assert (rm.bias, rm.gain, rm.template.spec, rm.score_std) == (0.0, 1.0, "huatuo", None)
    assert reward.load_reward_model(path, device="cpu", template="plain").template.spec == "plain"  # --template
    messages = [{"role": "user", "content": "孩子发烧咳嗽"}]
    ids = render(messages + [{"role": "assistant", "content": "多喝水。"}], tok, "huatuo")[0]
    with torch.no_grad():
        want = model.values(model.hidden_states(torch.tensor([ids])))[0, -1]
    torch.testing.assert_close(reward.score_texts(rm, [messages], ["多喝水。"])[0], want, atol=1e-5, rtol=0)


def test_errors_name_the_problem(base, tmp_path):
    path, tok, _ = base
    data = write_jsonl(tmp_path / "prefs.jsonl", [preferences(1)[0], {"prompt": "x", "answers": ["a"]}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: .*at least 2 answers"):
        reward.read_preferences(data, tok, "plain")
    with pytest.raises(ValueError, match="not a reward model"):
        reward.load_reward_model(path, device="cpu")


# ----------------------------------------------------------------------------- checkpoints, resume, --out

def _rm_cfg(path, data, out, **kw):
    kw = {**dict(template="plain", lora_r=4, lr=3e-3, eval_frac=0.2, eval_every=3, batch_size=4, seed=0,
                 device="cpu", lora_dropout=0.1, save_every=100), **kw}
    return reward.RMConfig(model=path, data=[data], out=str(out), **kw)


@pytest.mark.parametrize("lora_r", [4, 0])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(base, tmp_path, lora_r):
    path, _, _ = base
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences(30))
    full = reward.train(_rm_cfg(path, data, tmp_path / "full", lora_r=lora_r))
    part = reward.train(_rm_cfg(path, data, tmp_path / "part", lora_r=lora_r, stop_after=3))
    assert part["stopped"] and not (tmp_path / "part" / "reward_config.json").exists()
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a row after the checkpoint, then a torn line
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n" + '{"step": 5, "lo')
    with pytest.raises(ValueError, match="pass --resume"):
        reward.train(_rm_cfg(path, data, tmp_path / "part", lora_r=lora_r))
    rest = reward.train(_rm_cfg(path, data, tmp_path / "part", lora_r=lora_r, resume=True))
    assert {k: v for k, v in rest.items() if k != "out"} == {k: v for k, v in full.items() if k != "out"}
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    want = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(rows) == strip(want)  # one row per step: nothing after the checkpoint written twice
    name = "adapter_model.safetensors" if lora_r else "model.safetensors"
    assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    if lora_r:
        assert (tmp_path / "part" / "extra.safetensors").read_bytes() == \
            (tmp_path / "full" / "extra.safetensors").read_bytes()


def test_bad_input_leaves_the_old_reward_model_intact(trained, tmp_path, capsys):
    cfg, _, _ = trained
    before = {f: open(os.path.join(cfg.out, f), "rb").read() for f in os.listdir(cfg.out) if not f.startswith(".")
              and os.path.isfile(os.path.join(cfg.out, f))}
    argv = ["--model", cfg.model, "--out", cfg.out, "--overwrite", "--template", "plain", "--device", "cpu"]
    assert reward.main(argv + ["--data", str(tmp_path / "typo.jsonl")]) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answers": ["only one"]}])
    assert reward.main(argv + ["--data", bad]) == 2
    assert reward.main(argv + ["--data", cfg.data[0], "--model", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty.jsonl").write_text("")  # no answers: the bias, their mean score, would be NaN
    assert reward.main(argv + ["--data", cfg.data[0], "--norm-samples", str(tmp_path / "empty.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "typo.jsonl" in err[0] and "bad.jsonl:1" in err[1] and "nowhere" in err[2]
    assert err[3] == f"error: --norm-samples {tmp_path / 'empty.jsonl'}: no answers in it to normalise the scores with"
    after = {f: open(os.path.join(cfg.out, f), "rb").read() for f in before}
    assert after == before


def test_a_broken_normalisation_or_a_non_finite_score_stops_rl(trained, tmp_path):
    """A reward model whose bias is NaN (or a reward function that returns one) would turn the policy
    NaN at its next update: loading refuses the first, the scorer the second, naming it."""
    from nanohuatuo.reward_model import Scorer, read_rm_config
    cfg, _, _ = trained
    rc = json.load(open(os.path.join(cfg.out, "reward_config.json")))
    os.makedirs(tmp_path / "rm")
    with open(tmp_path / "rm" / "reward_config.json", "w") as f:
        json.dump({**rc, "bias": float("nan")}, f)  # json writes NaN, and reads it back
    with pytest.raises(ValueError, match=r"rm/reward_config.json: 'bias' is nan, not a finite number"):
        read_rm_config(tmp_path / "rm")
    # a key missing or of the wrong kind, a spread of 0 to divide by, a file that is not JSON: named, not a traceback
    for broken, said in (({k: v for k, v in rc.items() if k != "lora"}, "'lora' is None, not true or false"),
                         ({**rc, "score_std": 0.0}, "'score_std' is 0.0, not a positive number or null"),
                         ({**rc, "max_len": "512"}, "'max_len' is '512', not a positive number of tokens")):
        with open(tmp_path / "rm" / "reward_config.json", "w") as f:
            json.dump(broken, f)
        with pytest.raises(ValueError, match=re.escape(said)):
            read_rm_config(tmp_path / "rm")
    (tmp_path / "rm" / "reward_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"rm/reward_config.json: not a JSON file"):
        read_rm_config(tmp_path / "rm")
    from nanohuatuo.reward_model import load_reward_model
    os.makedirs(tmp_path / "sft")
    (tmp_path / "sft" / "adapter_config.json").write_text("{}")  # an SFT adapter given as --reward
    with pytest.raises(FileNotFoundError, match=r"holds a LoRA adapter \(adapter_config.json\) but no "
                                                r"reward_config.json: not a reward model \(an SFT adapter\?\)"):
        load_reward_model(tmp_path / "sft", device="cpu")
    score = Scorer(lambda prompts, responses, rows, texts: [0.5, float("inf")])
    with pytest.raises(ValueError, match=r"1 of 2 answers a score that is not a finite number \(inf for '乙'\)"):
        score([[1], [2]], [[3], [4]], [{}, {}], ["甲", "乙"])
    ok = Scorer(lambda prompts, responses, rows, texts: [0.5, -1.0])
    assert ok([[1], [2]], [[3], [4]], [{}, {}], ["甲", "乙"]).tolist() == [0.5, -1.0]


def test_a_second_run_on_the_same_out_refuses(base, tmp_path):
    from nanohuatuo.cli import prepare_out
    path, _, _ = base
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences(8))
    with prepare_out(tmp_path / "rm"):  # another run holds --out
        with pytest.raises(ValueError, match="in use by another run"):
            reward.train(_rm_cfg(path, data, tmp_path / "rm", resume=True))


# ----------------------------------------------------------------------------- statistics skip the doctor's reply

def _with_reference(rows, where=1):
    """Mixed feedback: the doctor's reply ranked among the answers, its position marked."""
    return [{**r, "answers": r["answers"][:where] + [r["reference"]] + r["answers"][where:],
             "reference_index": where} for r in rows]


def test_score_statistics_leave_out_the_doctors_reply(base, tmp_path):
    path, tok, _ = base
    rows = preferences(12, seed=3)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", _with_reference(rows))
    # the same policy answers whichever way they arrive: as preference records or as --norm-samples
    want = reward.policy_seqs(reward.read_preferences(plain, tok, "plain"))
    assert reward.policy_seqs(reward.read_preferences(mixed, tok, "plain")) == want
    assert reward.read_norm_samples(mixed, tok, "plain") == reward.read_norm_samples(plain, tok, "plain") == want
    # and a run's bias and spread: one model, statistics from answers with and without the reply
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences(20))
    runs = [reward.train(_rm_cfg(path, data, tmp_path / name, norm_samples=norm, max_steps=2))
            for name, norm in (("a", plain), ("b", mixed))]
    assert runs[0]["bias"] == runs[1]["bias"] and runs[0]["score_std"] == runs[1]["score_std"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**_with_reference(rows[:1])[0], "reference_index": 7}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: reference_index 7"):
        reward.read_preferences(bad, tok, "plain")


def test_torchrun_is_refused_in_one_line(monkeypatch, capsys):
    # the reward model has no data-parallel path: two processes would each train and write their own copy
    from nanohuatuo import reward
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert reward.main(["--model", "m", "--data", "p.jsonl"]) == 2
    assert capsys.readouterr().err == ("error: train_rm.py runs in one process (it has no data-parallel path, unlike "
                                       "SFT and PPO); start it with python, not torchrun\n")


def test_rl_stages_read_in_the_sft_adapter_s_template(base, tmp_path):
    """An SFT run writes its template next to its adapter (here HuatuoGPT-II's, on a base whose own is
    HuatuoGPT's): the reward model, PPO/GRPO's rollouts and DPO read the answers in it, as sampling
    wrote them, unless --template says otherwise."""
    from nanohuatuo.reward_model import rm_template
    from nanohuatuo.rollout import chat_setup
    from nanohuatuo.templates import render_prompt, resolve_template, save_chat_template, tokenizer_and_template
    path, tok, _ = base
    adapter = tmp_path / "sft"
    adapter.mkdir()
    save_chat_template(adapter, tok, "huatuo2")
    question = [{"role": "user", "content": "头疼三天怎么办"}]
    want = render_prompt(question, tok, resolve_template(adapter, "auto", tok))
    assert want != render_prompt(question, tok, resolve_template(path, "auto", tok))
    for template in (chat_setup(path, "auto", str(adapter))[1], tokenizer_and_template(path, str(adapter))[1],
                     rm_template(path, None, "auto", str(adapter))):
        assert render_prompt(question, tok, template) == want
    assert render_prompt(question, tok, chat_setup(path, "plain", str(adapter))[1]) == \
        render_prompt(question, tok, "plain")  # --template wins


QWEN_LIKE = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' + '\\n' }}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_writing_past_the_end_token_is_scored_at_the_end_token(tmp_path):
    """Qwen's template writes "<|im_end|>\\n": the reward model trains, is normalised and scores texts at
    <|im_end|>, where PPO reads a policy's answer (prompt + answer + end token), not at the newline after it;
    DPO's answer log-probs stop there too."""
    from nanohuatuo.preferences import read_preferences
    from nanohuatuo.reward_model import end_token, scored_seq, with_answer
    from nanohuatuo.templates import render_prompt, resolve_template
    base = tiny_base(tmp_path / "base", ["头痛 发热 怎么办 多 喝水 休息", "user assistant system"] * 20,
                     extra_tokens=("<|im_start|>", "<|im_end|>"))
    (tmp_path / "base" / "chat_template.jinja").write_text(QWEN_LIKE, encoding="utf-8")
    template = resolve_template(base.dir, "auto", base.tok)
    end = end_token(base.tok, template)
    assert end == base.tok.token_to_id("<|im_end|>")
    question = [{"role": "user", "content": "头痛发热怎么办"}]
    full = render(with_answer(question, "多喝水"), base.tok, template)[0]
    seq = scored_seq(with_answer(question, "多喝水"), base.tok, template)[0]
    assert full[:len(seq)] == seq and seq[-1] == end and len(full) > len(seq)  # the newline left out
    assert seq[:len(render_prompt(question, base.tok, template))] == render_prompt(question, base.tok, template)
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "头痛发热怎么办", "answers": ["多喝水", "休息"]}])
    [ex] = read_preferences(prefs, base.tok, template)
    assert [s[-1] for s in ex["seqs"]] == [end, end] and ex["seqs"][0] == seq
