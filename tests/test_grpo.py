"""GRPO / RLOO: advantages and loss against hand computations, the judge reward, a learning run
with a rule reward, exact resume, and the command line."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import torchrun_ranks_agree, word_tokenizer
from fake_openai import ScriptedServer
from nanohuatuo import ModelConfig, Transformer
from nanohuatuo import grpo
from nanohuatuo.losses import group_advantages, grpo_loss, kl_k3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "User", "Assistant", ":"] + [f"w{i}" for i in range(57)]  # 64 ids


# ----------------------------------------------------------------------------- the maths, by hand

def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # group 1: mean 2, unbiased std 1; group 2 all equal: no signal
    torch.testing.assert_close(group_advantages(scores, 3), torch.tensor([-1.0, 0, 1, 0, 0, 0]) / (1 + 1e-4))
    torch.testing.assert_close(group_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    # RLOO: r - mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5
    torch.testing.assert_close(group_advantages(scores, 3, "rloo", scale=False), torch.tensor([-1.5, 0, 1.5, 0, 0, 0]))
    four = torch.tensor([1.0, 1.0, 1.0, 5.0])  # mean 2, unbiased variance (1 + 1 + 1 + 9) / 3 = 4
    torch.testing.assert_close(group_advantages(four, 4), torch.tensor([-1.0, -1, -1, 3]) / (2 + 1e-4))
    torch.testing.assert_close(group_advantages(four, 4, "rloo", scale=False), torch.tensor([-4 / 3, -4 / 3, -4 / 3, 4]))
    torch.testing.assert_close(group_advantages(four, 4, "rloo"), torch.tensor([-4 / 3, -4 / 3, -4 / 3, 4]) / (2 + 1e-4))
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(scores, 1)


def test_kl_k3_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -2.0 + math.log(2), -1.5])
    # r = p_ref / p: 1, 2, e^-1 -> r - 1 - log r = 0, 1 - log 2, e^-1
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.0, 1 - math.log(2), math.exp(-1)]))


def test_grpo_loss_clipped_with_k3_by_hand():
    old = torch.tensor([[-1.0, -2.0], [-0.3, -0.7]])
    ratio = torch.tensor([[1.5, 0.5], [1.1, 3.0]])
    logp = (old + ratio.log()).requires_grad_(True)
    ref = logp.detach() + torch.tensor([[0.0, math.log(2)], [-1.0, 5.0]])  # ref - logp
    adv = torch.tensor([1.0, -2.0])  # one per answer
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the last token is padding
    loss, st = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.1)
    # max(-A r, -A clip(r)): 1.5, A+ -> -1.2 (clipped); 0.5, A+ -> -0.5; 1.1, A=-2 -> 2.2 (inside the range)
    k3 = [0.0, 1 - math.log(2), math.exp(-1)]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.1 * sum(k3)) / 3, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(1 / 3)
    assert st["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    assert st["kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    loss.backward()
    # d/dlogp: -A r where unclipped, plus beta * (1 - e^(ref - logp)); over the 3 tokens
    want = [[0.0, (-0.5 + 0.1 * (1 - 2)) / 3], [(2.2 + 0.1 * (1 - math.exp(-1))) / 3, 0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(want), atol=1e-6, rtol=0)
    # on-policy (old = logp.detach(), beta 0): the plain policy gradient -A / n per token
    logp.grad = None
    plain, st = grpo_loss(logp, logp.detach(), None, adv, mask)
    plain.backward()
    assert plain.item() == pytest.approx((-1 - 1 + 2) / 3) and st["ratio"].item() == 1.0
    assert math.isnan(st["kl"].item())  # no reference: not measured, not a KL of 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))


# ----------------------------------------------------------------------------- the judge reward

def shortest_first(request, path):
    """A judge that ranks the shortest candidate first (numbers as shown)."""
    text = request["messages"][-1]["content"]
    shown = re.findall(r"【候选回答(\d+)】\n(.*?)(?=\n\n|$)", text, re.S)
    if "w9" in text:
        return "I cannot rank these."  # no ranking line, ever
    order = sorted(shown, key=lambda c: (len(c[1]), c[0]))
    return "理由：短的更好。\n排名：" + " > ".join(n for n, _ in order)


def test_judge_reward_ranks_each_group_against_the_doctor(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "头痛"}], "reference": "多休息"}] * 3 + \
           [{"id": "b", "messages": [{"role": "user", "content": "w9"}], "reference": "看医生"}] * 3
    texts = ["w1 w2 w3", "w1", "w1 w2", "x", "yy", "zzz"]
    with ScriptedServer(shortest_first) as srv:
        cfg = grpo.GRPOConfig(model="m", data="p.jsonl", out=str(tmp_path), judge_base_url=srv.base_url,
                              judge_model_name="test-model", k=3)
        fn = grpo.judge_reward(cfg, 3)
        scores = fn(None, None, rows, texts)
        asked = srv.requests
    assert scores == [0.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # best 1, worst 0; an unranked group scores 0.5 throughout
    assert fn.stats["unranked"] == 1
    first = next(body["messages"][-1]["content"] for _, body in asked if "头痛" in body["messages"][-1]["content"])
    assert "多休息" in first and "真实医生的回复" in first  # the doctor's reply as the reference
    with pytest.raises(ValueError, match="no doctor's reply"):
        fn(None, None, [{"id": "c", "messages": [], "reference": None}] * 3, ["a", "b", "c"])
    # answers that never stopped get --missing-eos-penalty whatever they score: not ranked, and a group with fewer
    # than two others not asked at all
    ended = [True, False, True, False, False, True]
    with ScriptedServer(shortest_first) as srv:
        cfg = grpo.GRPOConfig(model="m", data="p.jsonl", out=str(tmp_path), judge_base_url=srv.base_url,
                              judge_model_name="test-model", k=3, missing_eos_penalty=-1.0,
                              cache=str(tmp_path / "again.sqlite"))
        fn = grpo.judge_reward(cfg, 3)
        scores = fn(None, None, [{**r, "ended": e} for r, e in zip(rows, ended)], texts)
        assert len(srv.requests) == 1 and srv.requests[0][1]["messages"][-1]["content"].count("【候选回答") == 2
    assert scores[:3] == [0.0, 0.5, 1.0] and scores[3:] == [0.5] * 3 and fn.stats["not asked"] == 1


# ----------------------------------------------------------------------------- training on a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_base")
    word_tokenizer(d, WORDS)
    model = Transformer(ModelConfig(arch="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=64, max_seq_len=128))
    model.init_weights(std=0.1, seed=0)
    model.save_pretrained(d)
    g = torch.Generator().manual_seed(2)
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(32):
            words = " ".join(f"w{int(t)}" for t in torch.randint(0, 57, (1 + i % 5,), generator=g))
            f.write(json.dumps({"messages": [{"role": "user", "content": words},
                                             {"role": "assistant", "content": "w1"}]}) + "\n")
    rules = d / "rules.py"
    rules.write_text("def short(prompts, responses, rows, texts):\n"
                     "    return [-len(r) / 8 for r in responses]\n")
    return str(d)


def test_the_policy_is_tuned_for_the_rollouts_compiled_step(tiny, monkeypatch):
    """--compile: the policy's CPU kernels are chosen for a compiled decode step (the compiler's own
    batch-1 loops among them, cpu_kernels.tune_cpu_kernels(compiled=True)), and only then."""
    import nanohuatuo.rollout as rollout
    seen, real = [], rollout.use_column_major_weights
    monkeypatch.setattr(rollout, "use_column_major_weights", lambda m, compiled=False: seen.append(compiled) or real(m))
    for compile in (False, True):
        model, _, _ = rollout.policy_model(tiny, lora_r=4, lora_alpha=8, compile=compile)
        assert model.cpu_kernels is not None
    assert seen == [False, True]


def tiny_cfg(base, out, **kw):
    d = dict(model=base, data=os.path.join(base, "prompts.jsonl"), out=str(out), template="plain", max_steps=2,
             batch_size=4, k=4, max_new_tokens=6, micro_batch_size=8, lr=3e-3, lora_r=4, lora_alpha=8,
             sample_every=0, save_every=100, missing_eos_penalty=None, device="cpu",
             reward_fn=os.path.join(base, "rules.py") + ":short")
    d.update(kw)
    return grpo.GRPOConfig(**d)


def test_a_rule_reward_for_short_answers_shortens_them(tiny, tmp_path):
    res = grpo.train(tiny_cfg(tiny, tmp_path / "run", max_steps=10, batch_size=8, micro_batch_size=32, lr=1e-2))
    lengths = [r["response_length"] for r in res["history"]]
    assert res["steps"] == 10 and not res["stopped"] and res["out"] == str(tmp_path / "run")
    assert res["last_score"] > res["first_score"] + 0.2, [r["score"] for r in res["history"]]
    assert lengths[-1] < lengths[0] - 1.5, lengths
    assert math.isfinite(res["last_kl"]) and res["last_kl"] > 0 and res["seconds"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "curves.png",
            "grpo_stats.png"} <= set(os.listdir(tmp_path / "run"))


def test_stop_after_and_resume_match_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(max_steps=3, advantage="rloo", num_iterations=2, micro_batch_size=6, sample_every=1)
    grpo.train(tiny_cfg(tiny, tmp_path / "full", **kw))
    part = grpo.train(tiny_cfg(tiny, tmp_path / "part", stop_after=2, **kw))
    assert part["stopped"] and not (tmp_path / "part" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="lora_r=4.*lora_r=8"):
        grpo.train(tiny_cfg(tiny, tmp_path / "part", resume=True, **{**kw, "lora_r": 8}))
    grpo.train(tiny_cfg(tiny, tmp_path / "part", resume=True, **kw))
    assert (tmp_path / "part" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    rows = [json.loads(x) for x in open(tmp_path / "part" / "metrics.jsonl")]
    want = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r, w in zip(rows, want):
        assert r["score"] == w["score"] and r["loss"] == w["loss"] and r["kl"] == w["kl"]


def test_cli_run_bad_reward_fn_and_flags(tiny, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, os.path.join(ROOT, "train_grpo.py"), "--model", tiny, "--data",
            os.path.join(tiny, "prompts.jsonl"), "--template", "plain", "--max-steps", "1", "--batch-size", "2",
            "--k", "3", "--max-new-tokens", "4", "--lora-r", "4", "--device", "cpu", "--sample-every", "1"]
    r = subprocess.run(args + ["--out", str(tmp_path / "cli"), "--reward-fn", os.path.join(tiny, "rules.py") + ":short",
                               "--save-merged", "--no-scale-rewards", "--beta", "0"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1/1" in r.stdout and "sample 0 at step 1" in r.stdout
    [row] = [json.loads(line) for line in open(tmp_path / "cli" / "metrics.jsonl")]
    assert row["kl"] == row["ref_kl"] == "nan"  # --beta 0: no reference, no KL measured (strict JSON: a string)
    assert {"merged", "adapter_model.safetensors", "grpo_config.json"} <= set(os.listdir(tmp_path / "cli"))
    bad = subprocess.run(args + ["--out", str(tmp_path / "bad"), "--reward-fn", os.path.join(tiny, "rules.py") + ":nope"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "has no function nope" in bad.stderr
    assert "Traceback" not in bad.stderr
    from nanohuatuo.cli import parse_config
    cfg = parse_config(grpo.GRPOConfig, ["--model", "m", "--data", "p", "--k", "8", "--advantage", "rloo",
                                         "--no-scale-rewards", "--beta", "0.1", "--reward-fn", "mod:fn"])
    assert (cfg.k, cfg.advantage, cfg.scale_rewards, cfg.beta, cfg.reward_fn) == (8, "rloo", False, 0.1, "mod:fn")


def test_torchrun_two_ranks_stay_in_sync(tiny, tmp_path):
    """Two processes draw different prompts, average their LoRA gradients and end with the same weights."""
    base = tiny
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
torch.set_num_threads(1)
from nanohuatuo import grpo
from nanohuatuo.lora import lora_parameters
cfg = grpo.GRPOConfig(model={base!r}, data={os.path.join(base, 'prompts.jsonl')!r}, out={str(tmp_path / 'out')!r},
                      template="plain", max_steps=2, batch_size=4, k=4, max_new_tokens=6, micro_batch_size=8,
                      lr=3e-3, lora_r=4, lora_alpha=8, sample_every=0, missing_eos_penalty=None, device="cpu",
                      reward_fn={os.path.join(base, 'rules.py') + ':short'!r})
models = []
orig = grpo.policy_model
grpo.policy_model = lambda *a, **k: models.append(orig(*a, **k)) or models[-1]
grpo.train(cfg)
flat = torch.cat([p.detach().flatten() for p in lora_parameters(models[0][0])])
torch.save(flat, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
""")
    torchrun_ranks_agree(script, tmp_path)
