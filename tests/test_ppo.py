"""PPO: the math against hand computations, masks, the reference = adapters off, the shared reward
model, export and resume, torchrun, and a learning run on a tiny model with a known reward."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import torchrun_ranks_agree, word_tokenizer
from nanohuatuo import ModelConfig, Transformer, Tokenizer
from nanohuatuo import ppo, reward_model, rollout
from nanohuatuo.losses import TokenLogprobs, length_debias, response_forward, token_logprobs, whiten
from nanohuatuo.reward_model import Scorer, ScoreScale, end_at_stop_string, scorer
from nanohuatuo.templates import resolve_template
from nanohuatuo.lora import apply_lora, disabled_adapters, lora_modules, save_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "User", "Assistant", ":"] + [f"w{i}" for i in range(57)]  # 64 ids
EOS, PAD = 2, 3
GOOD = range(7, 17)  # the learning test rewards answers made of these ids (w0..w9)



# ----------------------------------------------------------------------------- the math, by hand

def test_gae_and_returns_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 0.2, 1.0], [0.3, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2], [1.0, 0.5, 7.0, 7.0]])  # 9s and 7s sit on padding
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, backwards: deltas 0.8, 0.2 + 0.9*0.2 - 0.3 = 0.08, -0.1 + 0.27 - 0.4 = -0.23, 0.36 - 0.5 = -0.14
    # A3 = 0.8, A2 = 0.08 + 0.45*0.8 = 0.44, A1 = -0.23 + 0.45*0.44 = -0.032, A0 = -0.14 + 0.45*(-0.032)
    # row 1 ends at t=1: A1 = 2.0 - 0.5 = 1.5, A0 = 0.3 + 0.9*0.5 - 1.0 + 0.45*1.5 = 0.425
    want_adv = torch.tensor([[-0.1544, -0.032, 0.44, 0.8], [0.425, 1.5, 0.0, 0.0]])
    torch.testing.assert_close(adv, want_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, want_adv + values * mask, atol=1e-6, rtol=0)
    assert ret[1, 2:].abs().max() == 0
    # the defaults (gamma 1, lambda 0.95) on one token: A = r - V
    a1, r1 = ppo.gae(torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.ones(1, 1))
    assert a1.item() == 1.5 and r1.item() == 2.0


def test_rewards_kl_k1_and_k3():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = ppo.compute_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1 - 1.0, 0.0, 0.0]]))
    _, k3 = ppo.compute_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k3")
    # k3 = exp(ref - logp) - 1 - (ref - logp)
    want = [[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0], [math.exp(-1.0) - 1 + 1.0, 0.0, 0.0]]
    torch.testing.assert_close(k3, torch.tensor(want))


def test_policy_loss_clipped_branches_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])  # the last one is padding
    old = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -1.2, -1.0]])
    logp = (old + ratio.log()).requires_grad_(True)
    loss, stats = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): 1.5,A+ -> -1.2 (clipped); 0.5,A+ -> -0.5; 1.5,A- -> 1.5; 0.5,A- -> 0.8 (clipped);
    # 1.1,A=2 -> -2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(
        0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2) / 5, abs=1e-6)
    loss.backward()
    # clipped branches pass no gradient; the others -A * ratio / n
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.1, 0.3, 0.0, -0.44, 0.0]]), atol=1e-6, rtol=0)
    # an extreme log-ratio is clamped, so the loss stays finite
    big, _ = ppo.policy_loss(torch.tensor([[50.0]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert big.item() == pytest.approx(math.exp(20.0), rel=1e-5)
    # denom: a micro-batch's share of a minibatch's token mean
    half, _ = ppo.policy_loss(logp.detach(), old, adv, mask, clip=0.2, denom=torch.tensor(10.0))
    assert half.item() == pytest.approx(loss.item() / 2, abs=1e-6)


def test_value_loss_clipped_by_hand():
    v = torch.tensor([[1.0, 0.6, 0.0, -1.0, 5.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0, 1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    loss, stats = ppo.value_loss(v, old, ret, mask, clip=0.2)
    # v_clipped = 0.7, 0.6, 0.3, -0.2; max((v-R)^2, (vc-R)^2) = 1.69 (clip), 0.36, 1.0, 3.24 (clip)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.36 + 1.0 + 3.24) / 4, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_whiten_over_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    w = whiten(x, mask)
    # valid 1, 2, 3, 4: mean 2.5, unbiased variance 5/3
    want = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3)
    torch.testing.assert_close(w[mask.bool()], want, atol=1e-6, rtol=0)
    assert w[~mask.bool()].abs().max() == 0
    one = torch.tensor([[7.0, 9.0]])
    assert torch.equal(whiten(one, torch.tensor([[1.0, 0.0]])), torch.tensor([[7.0, 0.0]]))  # < 2 tokens


def test_masks_stop_truncation_and_left_padded_prompts():
    responses = [[10, 11, EOS, 12, 13],  # EOS mid-way: cut after it
                 [20, 21, 22, 23, 24],  # never stops
                 [30, EOS]]  # shorter, stops at its end
    b = rollout.pack([[1, 5, 6], [1], [1, 7]], responses, stop_ids=[EOS], pad_id=PAD)
    P = b.P
    assert P == 3
    assert b.ids.tolist() == [[1, 5, 6, 10, 11, EOS, PAD, PAD],
                                 [PAD, PAD, 1, 20, 21, 22, 23, 24],
                                 [PAD, 1, 7, 30, EOS, PAD, PAD, PAD]]
    assert b.attn.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0, 0]]
    assert b.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b.ended.tolist() == [True, False, True]
    # pad == EOS: the stop token stays a real token in the mask
    tokens = torch.tensor([[4, EOS, EOS, EOS], [4, 5, 6, 7]])
    for lengths in ([2, 4], None):
        cut, mask, ended = rollout.masks_after_stop(tokens, [EOS], pad_id=EOS, lengths=lengths)
        assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]
    # without lengths, a trailing run of pad is padding
    cut, mask, ended = rollout.masks_after_stop(torch.tensor([[4, 5, PAD, PAD], [4, PAD, 6, EOS]]), [EOS], PAD)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [False, True]


def test_token_logprobs_match_log_softmax_with_gradients():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(50, 8)
    t = torch.randint(0, 50, (10,))
    logp = TokenLogprobs.apply(h, w, t, 0.7, 3)  # 4 chunks, the last one short
    # the entropy comes from token_logprobs' plain path (the rollout's no-grad forwards)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    head.weight.copy_(w)
    model = type("Head", (), {"lm_head": head, "logits": staticmethod(head)})()
    with torch.no_grad():
        plain, ent = token_logprobs(model, h, t, 0.7, want_entropy=True)
    z = (h @ w.t()) / 0.7
    ref = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, -(z.softmax(-1) * torch.log_softmax(z, -1)).sum(-1).detach(), atol=1e-5, rtol=0)
    weights = torch.randn(10)
    ours, = torch.autograd.grad((logp * weights).sum(), h)
    want, = torch.autograd.grad((ref * weights).sum(), h)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=100) == pytest.approx(0.1 * 1.002)
    assert ppo.adaptive_kl_coef(0.1, kl=5.7, target=6.0, horizon=10000, n_steps=100) == pytest.approx(0.1 * (1 - 0.05 * 0.01))


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama-shaped model from scratch with its tokenizer, an SFT adapter and 64 prompts."""
    d = tmp_path_factory.mktemp("ppo_base")
    word_tokenizer(d, WORDS)  # 64 ids: <unk> <s> </s> <pad>, the 'plain' template's words, w0..w56
    model = Transformer(ModelConfig(arch="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=64, max_seq_len=128))
    model.init_weights(std=0.1, seed=0)  # 0.1, not 0.02: so a 32-wide model's logits can move far from uniform
    model.save_pretrained(d)
    torch.manual_seed(0)  # LoRA A is drawn from the global generator
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    model.source_dir = str(d)
    sft = tmp_path_factory.mktemp("ppo_sft")
    save_adapter(model, sft)
    g = torch.Generator().manual_seed(2)
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(64):
            words = " ".join(f"w{int(t)}" for t in torch.randint(0, 57, (1 + i % 5,), generator=g))
            f.write(json.dumps({"messages": [{"role": "user", "content": words},
                                             {"role": "assistant", "content": "w1"}], "source": "test"}) + "\n")
    return str(d), str(sft)


def tiny_cfg(base, out, **kw):
    d = dict(model=base, data=os.path.join(base, "prompts.jsonl"), out=str(out), template="plain",
             max_steps=2, batch_size=16, max_new_tokens=6, micro_batch_size=8, num_mini_batches=2, lr=3e-3,
             lora_r=4, lora_alpha=8, sample_every=0, save_every=100, missing_eos_penalty=None, device="cpu")
    d.update(kw)
    return ppo.PPOConfig(**d)


def good_fraction(prompts, responses, rows, texts):
    """The known reward: the share of answer tokens among GOOD."""
    return torch.tensor([sum(t in GOOD for t in r) / len(r) for r in responses])


def batch_for(model_dir):
    tok = Tokenizer(model_dir)
    rows, prompts = rollout.load_prompts(os.path.join(model_dir, "prompts.jsonl"), tok, "plain", 512)
    responses = [[7 + i % 9, 20 + i, EOS][: 1 + i % 3] for i in range(6)]
    return rollout.pack(prompts[:6], responses, [EOS], tok.pad_id)


def logp_of(model, b, temperature=0.7):
    with torch.no_grad():
        return response_forward(model, b.ids, b.attn, b.P, temperature)[0] * b.mask


def randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def test_reference_is_the_model_without_the_adapter(tiny, tmp_path):
    base, sft = tiny
    b = batch_for(base)
    plain = logp_of(Transformer.from_pretrained(base), b)
    with_sft = logp_of(Transformer.from_pretrained(base, adapter=sft), b)
    assert (plain - with_sft).abs().max() > 1e-2  # the SFT adapter matters
    for adapter, cont, want in [(None, False, plain), (sft, False, with_sft), (sft, True, with_sft)]:
        m = ppo.build_models(tiny_cfg(base, tmp_path, adapter=adapter, continue_adapter=cont))
        torch.testing.assert_close(logp_of(m.model, b), want, atol=1e-5, rtol=0)  # step 0 is the SFT model
        randomise_lora(m.model)  # as if trained
        assert (logp_of(m.model, b) - want).abs().max() > 1e-2
        with ppo.reference(m):
            torch.testing.assert_close(logp_of(m.model, b), want, atol=1e-5, rtol=0)
    # no second copy: the reference runs on the very same parameters
    m = ppo.build_models(tiny_cfg(base, tmp_path))
    with disabled_adapters(m.model):
        assert torch.equal(logp_of(m.model, b), plain)


def test_separate_critic_has_its_own_adapter_and_gradients(tiny, tmp_path):
    base, _ = tiny
    b = batch_for(base)
    m = ppo.build_models(tiny_cfg(base, tmp_path, critic="separate"))
    randomise_lora(m.model)
    torch.nn.init.normal_(m.value_head.weight, std=0.5)
    policy_logp = logp_of(m.model, b)
    with ppo.critic(m):
        _, _, v = response_forward(m.model, b.ids, b.attn, b.P, 0.7, m.value_head, want_logp=False)
        v.sum().backward()
        critic_logp = logp_of(m.model, b)
    assert (critic_logp - policy_logp).abs().max() > 1e-2  # critic trunk = base + its own (fresh) adapter
    assert torch.equal(logp_of(m.model, b), policy_logp)  # policy weights back after the block
    assert all(p.grad is None for p in m.model.parameters())  # nothing reached the policy
    b_grads = [b_.grad for _, b_ in m.critic_lora.values()]  # B (zero at the start) gets the first gradient
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)


@pytest.fixture(scope="module")
def rm_dir(tiny, tmp_path_factory):
    """A LoRA reward model as train_rm.py writes it: on base + merged SFT, head in extra.safetensors."""
    from nanohuatuo.lora import merge_and_unload
    base, sft = tiny
    d = tmp_path_factory.mktemp("ppo_rm")
    rm_model = merge_and_unload(Transformer.from_pretrained(base, adapter=sft))
    torch.manual_seed(0)
    apply_lora(rm_model, r=2, alpha=3, dropout=0.0, targets=["q_proj", "down_proj"])  # within the SFT targets
    randomise_lora(rm_model, seed=5)
    g = torch.Generator().manual_seed(6)
    head = {"value_head.weight": torch.randn(1, 32, generator=g), "value_head.bias": torch.tensor([0.3])}
    save_adapter(rm_model, d, extra=head)
    with open(d / "reward_config.json", "w") as f:
        json.dump({"base": os.path.abspath(base), "sft_adapter": os.path.abspath(sft), "template": "plain",
                   "bias": 0.25, "gain": 2.0, "lora": True, "max_len": 64}, f)
    return str(d)


def test_shared_reward_model_matches_the_separate_one(tiny, rm_dir, tmp_path):
    from nanohuatuo.reward import load_reward_model, score_ids
    base, sft = tiny
    seqs = [[4, 6, 10, 11, 5, 6, 12, 13, EOS], [4, 6, 20, 5, 6, EOS], [4, 6, 7, 8, 9, 5, 6, 30]]
    want = score_ids(load_reward_model(rm_dir, device="cpu"), seqs)
    tok = Tokenizer(base)
    for cont in (False, True):
        cfg = tiny_cfg(base, tmp_path, adapter=sft, continue_adapter=cont, reward=rm_dir)
        m = ppo.build_models(cfg)
        randomise_lora(m.model)  # the policy's own adapter must not leak into the score
        rm, why = ppo.shared_reward_model(m, cfg, tok)
        assert rm is not None, why
        fn = scorer(rm, tok, resolve_template(base, "plain")).fn
        got = fn([s[:5] for s in seqs], [s[5:] for s in seqs], None, None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # scores are ~10: merged vs LoRA rounding
        b = batch_for(base)
        before = logp_of(m.model, b)
        fn([s[:5] for s in seqs], [s[5:] for s in seqs], None, None)
        assert torch.equal(logp_of(m.model, b), before) and m.model.value_head is m.value_head  # all restored
    # a policy without the reward model's SFT adapter cannot share its trunk
    rm, why = ppo.shared_reward_model(m, tiny_cfg(base, tmp_path, reward=rm_dir), tok)
    assert rm is None and why.startswith("it was trained on the SFT adapter")


def test_critic_from_the_reward_model_starts_at_its_scores(tiny, rm_dir, tmp_path):
    """--critic reward: the critic's first values are the reward model's scores in PPO's units."""
    import shutil
    from nanohuatuo.reward import load_reward_model, score_ids
    from nanohuatuo.reward_model import raw_scores
    base, sft = tiny
    rm2 = tmp_path / "rm"
    shutil.copytree(rm_dir, rm2)
    rc = json.loads((rm2 / "reward_config.json").read_text())
    (rm2 / "reward_config.json").write_text(json.dumps({**rc, "score_std": 0.5}))  # spread: 0.5 x gain 2
    seqs = [[4, 6, 10, 11, 5, 6, 12, 13, EOS], [4, 6, 20, 5, 6, EOS], [4, 6, 7, 8, 9, 5, 6, 30]]
    want = score_ids(load_reward_model(str(rm2), device="cpu"), seqs) / (0.5 * 2.0)
    tok = Tokenizer(base)
    cfg = tiny_cfg(base, tmp_path, adapter=sft, reward=str(rm2), critic="reward", lora_r=4)
    m = ppo.build_models(cfg)
    reward = ppo.make_reward(None, m, cfg, tok, resolve_template(base, "plain"), ppo.dist.Dist(0, 1, torch.device("cpu")), torch.float32)
    ppo.start_critic_from_reward(m, reward, cfg)
    randomise_lora(m.model)  # the policy's own adapter must not reach the critic
    m.model.value_head = m.value_head
    with ppo.critic(m):
        got = raw_scores(m.model, seqs, tok.pad_id, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for ab in m.critic_lora.values() for p in ab)  # trainable copies
    assert not any(p.requires_grad for ab in reward.rm.lora.values() if ab for p in ab)  # the RM stays frozen
    with pytest.raises(ppo.UserError, match="rank 2, above the PPO LoRA rank 1"):
        ppo.start_critic_from_reward(ppo.build_models(tiny_cfg(base, tmp_path, adapter=sft, critic="reward",
                                                              lora_r=1, lora_alpha=2)), reward, cfg)
    with pytest.raises(ppo.UserError, match="--critic shared or separate"):
        ppo.start_critic_from_reward(m, Scorer(good_fraction), cfg)


# ----------------------------------------------------------------------------- training runs

def test_ppo_raises_the_score_with_bounded_kl(tiny, tmp_path):
    base, _ = tiny
    cfg = tiny_cfg(base, tmp_path / "run", max_steps=40, batch_size=64, max_new_tokens=8, micro_batch_size=32,
                   lr=3e-3, value_lr=1e-2, kl_coef=0.05)
    out = ppo.train(cfg, reward_fn=good_fraction)
    h = out["history"]
    first = sum(r["score"] for r in h[:5]) / 5
    last = sum(r["score"] for r in h[-5:]) / 5
    # about 10 of 64 ids are GOOD: ~0.19 at the start; PPO takes it to ~0.3 (the 5-step noise is ~0.01)
    assert 0.1 < first < 0.25 and last > first + 0.07, (first, last)
    assert max(r["kl"] for r in h) < 6.0  # nats per answer of 8 tokens (about 3 in practice)
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples from the reference itself
    assert max(r["logprob_gap"] for r in h) < 1e-4  # recomputed old log-probs match the sampler's
    assert out["first_score"] == h[0]["score"] and out["last_kl"] == h[-1]["kl"]
    assert all(0.5 < r["ratio"] < 2 for r in h)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 40 and {"score", "kl", "reward", "approx_kl", "clipfrac", "vf_clipfrac", "entropy",
                                "response_length", "eos_rate", "value_ev", "kl_coef", "lr", "rollout_s",
                                "update_s"} <= set(rows[0])
    assert (tmp_path / "run" / "curves.png").exists()


def test_resume_is_exact_and_export_loads_on_the_base(tiny, tmp_path):
    base, sft = tiny
    kw = dict(adapter=sft, save_every=1, adaptive_kl=True, kl_horizon=100, missing_eos_penalty=-1.0)
    straight = ppo.train(tiny_cfg(base, tmp_path / "a", max_steps=3, **kw), reward_fn=good_fraction)
    ppo.train(tiny_cfg(base, tmp_path / "b", max_steps=2, **kw), reward_fn=good_fraction)
    with pytest.raises(ValueError, match="--resume"):
        ppo.train(tiny_cfg(base, tmp_path / "b", max_steps=3, **kw), reward_fn=good_fraction)
    resumed = ppo.train(tiny_cfg(base, tmp_path / "b", max_steps=3, resume=True, **kw), reward_fn=good_fraction)
    assert len(resumed["history"]) == 1
    for k in ("score", "kl", "kl_coef", "pg_loss", "vf_loss", "approx_kl"):
        assert resumed[k] == straight[k], k
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_000003"]  # keep_checkpoints=1
    # the export is SFT (+) PPO as one adapter on the original base
    b = batch_for(base)
    exported = logp_of(Transformer.from_pretrained(base, adapter=str(tmp_path / "a")), b)
    from nanohuatuo.lora import load_adapter, merge_and_unload
    trained = merge_and_unload(Transformer.from_pretrained(base, adapter=sft))
    load_adapter(trained, tmp_path / "a" / "checkpoints" / "step_000003" / "policy")
    torch.testing.assert_close(exported, logp_of(trained, b), atol=1e-5, rtol=0)
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["r"] == 4 + 4 and cfg["base_model_name_or_path"] == os.path.abspath(base)


def test_torchrun_two_ranks_stay_in_sync(tiny, tmp_path):
    base, _ = tiny
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
torch.set_num_threads(1)
from nanohuatuo import ppo
from nanohuatuo.lora import lora_parameters
def reward(prompts, responses, rows, texts):
    return torch.tensor([sum(7 <= t < 17 for t in r) / len(r) for r in responses])
cfg = ppo.PPOConfig(model={base!r}, data={os.path.join(base, 'prompts.jsonl')!r}, out={str(tmp_path / 'out')!r},
                    template="plain", max_steps=2, batch_size=16, max_new_tokens=6, micro_batch_size=8, lr=3e-3,
                    lora_r=4, lora_alpha=8, sample_every=0, missing_eos_penalty=None, device="cpu")
models = []
orig = ppo.build_models
ppo.build_models = lambda *a, **k: models.append(orig(*a, **k)) or models[-1]
ppo.train(cfg, reward)
m = models[0]
flat = torch.cat([p.detach().flatten() for p in lora_parameters(m.model)] + [m.value_head.weight.flatten()])
torch.save(flat, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
""")
    torchrun_ranks_agree(script, tmp_path)


def test_cli_flags_parse():
    from nanohuatuo.cli import parse_config
    cfg = parse_config(ppo.PPOConfig, ["--model", "p", "--data", "x.jsonl", "--out", "o", "--reward", "r",
                          "--kl-estimator", "k3", "--adaptive-kl", "--missing-eos-penalty", "none",
                          "--critic", "separate", "--lora-targets", "q_proj,v_proj", "--max-steps", "3"])
    assert cfg.kl_estimator == "k3" and cfg.adaptive_kl and cfg.missing_eos_penalty is None
    assert cfg.critic == "separate" and cfg.lora_targets == ["q_proj", "v_proj"] and cfg.max_steps == 3
    assert parse_config(ppo.PPOConfig, ["--model", "p", "--data", "x", "--out", "o"]).temperature == 0.7


def test_cli_run_with_reward_model_separate_critic_and_merged_export(tiny, rm_dir, tmp_path):
    base, _ = tiny
    out = tmp_path / "cli"
    # no --adapter, so the reward model (trained on base + SFT) is loaded as its own model
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_ppo.py"), "--model", base, "--reward", rm_dir,
                        "--data", os.path.join(base, "prompts.jsonl"), "--out", str(out), "--max-steps", "2",
                        "--batch-size", "8", "--max-new-tokens", "4", "--template", "plain", "--lora-r", "4",
                        "--micro-batch-size", "4", "--critic", "separate", "--sample-every", "2", "--save-merged",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2" in r.stdout and "sample 0 at step 2" in r.stdout and "--adapter" in r.stdout
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "critic", "merged", "metrics.jsonl",
            "samples.jsonl", "curves.png", "ppo_stats.png", "checkpoints"} <= names
    assert "extra.safetensors" in os.listdir(out / "critic")  # the value head goes with the critic
    assert os.path.exists(out / "checkpoints" / "step_000002" / "state.json")
    assert "cannot share the policy's base (it was trained on the SFT adapter" in r.stdout
    b = batch_for(base)
    merged = logp_of(Transformer.from_pretrained(out / "merged"), b)
    torch.testing.assert_close(merged, logp_of(Transformer.from_pretrained(base, adapter=str(out)), b),
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- HuatuoGPT's bases, stop strings, reward scale

FAMILIES = {
    "baichuan": dict(arch="baichuan", qkv="packed", ffn_dim=64),
    "bloom": dict(arch="bloom", norm="layer", norm_eps=1e-5, mlp="gelu", pos="alibi", qkv="bloom", qkv_bias=True,
                  o_bias=True, mlp_bias=True, embed_norm=True, tie_embeddings=True, ffn_dim=128),
}


def family_run(tmp_path, family):
    """A tiny base of the family, an SFT adapter and a LoRA reward model on base + SFT, all on the
    default targets (Baichuan's W_pack, BLOOM's query_key_value, ...), as train_sft/train_rm write them."""
    from nanohuatuo.lora import default_targets, merge_and_unload
    base, sft, rm = tmp_path / "base", tmp_path / "sft", tmp_path / "rm"
    base.mkdir()
    word_tokenizer(base, WORDS)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=128, **FAMILIES[family]))
    model.init_weights(std=0.1, seed=0)
    model.save_pretrained(base)
    with open(base / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"w{i} w{i + 3}"}]}) + "\n")
    torch.manual_seed(0)
    apply_lora(model, r=2, alpha=4, dropout=0.0, targets=default_targets(model))
    randomise_lora(model, seed=4)
    save_adapter(model, sft)
    rm_model = merge_and_unload(Transformer.from_pretrained(base, adapter=sft))
    apply_lora(rm_model, r=2, alpha=4, dropout=0.0, targets=default_targets(rm_model))
    randomise_lora(rm_model, seed=5)
    g = torch.Generator().manual_seed(6)
    save_adapter(rm_model, rm, extra={"value_head.weight": torch.randn(1, 32, generator=g),
                                      "value_head.bias": torch.tensor([0.3])})
    with open(rm / "reward_config.json", "w") as f:
        json.dump({"base": str(base), "sft_adapter": str(sft), "template": "plain", "bias": 0.1, "gain": 1.0,
                   "lora": True, "max_len": 64, "score_std": 0.5}, f)
    return str(base), str(sft), str(rm)


@pytest.mark.parametrize("family", ["baichuan", "bloom"])
def test_huatuo_bases_load_the_base_once(tmp_path, family, monkeypatch, capsys):
    base, sft, rm = family_run(tmp_path, family)
    loads = []
    monkeypatch.setattr(reward_model, "load_reward_model",
                        lambda *a, **k: loads.append(a) or pytest.fail("second copy"))
    out = ppo.train(tiny_cfg(base, tmp_path / "out", adapter=sft, reward=rm, data=os.path.join(base, "prompts.jsonl"),
                             max_steps=1, batch_size=4, micro_batch_size=4, num_mini_batches=1, max_new_tokens=4))
    said = capsys.readouterr().out
    assert "shares the policy's base" in said and "divided by 0.5" in said and not loads
    assert out["steps"] == 1 and math.isfinite(out["score"])
    targets = json.load(open(tmp_path / "out" / "adapter_config.json"))["target_modules"]
    assert {"W_pack"} <= set(targets) if family == "baichuan" else {"query_key_value"} <= set(targets)


def test_a_reward_model_that_cannot_share_says_why(tmp_path, capsys):
    base, sft, rm = family_run(tmp_path, "baichuan")
    ppo.train(tiny_cfg(base, tmp_path / "out", adapter=sft, reward=rm, data=os.path.join(base, "prompts.jsonl"),
                       lora_targets=["o_proj"], max_steps=1, batch_size=4, micro_batch_size=4, max_new_tokens=2))
    assert "cannot share the policy's base (its LoRA layers" in capsys.readouterr().out


def test_stop_string_answers_end_on_the_end_token(tiny, tmp_path, monkeypatch):
    """An answer that stops on a stop string is cut before it and ends on the template's end token, so
    the reward reads the position it was trained on and the policy learns to end its turn; an answer
    cut by the token limit is read closed by the end token as well (the penalty, when set, replaces it)."""
    from nanohuatuo.generate import Generation
    base, _ = tiny
    tok = Tokenizer(base)
    stop = ["w5 w6"]
    assert end_at_stop_string([10, 11], tok, stop, EOS) is None  # w3 w4
    assert end_at_stop_string([10, 12, 14], tok, stop, EOS) is None  # w3 w5 w7
    assert end_at_stop_string([10, 11, 12, 13], tok, stop, EOS) == [10, 11, EOS]  # w3 w4 w5 w6 -> w3 w4 </s>
    assert end_at_stop_string([10, 12, 13], tok, stop, EOS) == [10, EOS]

    def fake(model, prompts, n, **kw):
        answers = [[10, 12, 13], [10, 11, EOS], [10, 11, 14]]  # stop string, end token, cut by length
        return Generation(tokens=answers[:len(prompts)], logprobs=[[-1.0] * len(a) for a in answers[:len(prompts)]],
                          finished=[True, True, False][:len(prompts)])
    monkeypatch.setattr(rollout, "generate_batch", fake)
    cfg = tiny_cfg(base, tmp_path)
    m = ppo.build_models(cfg)
    seen = []
    reward = Scorer(lambda p, r, rows, texts: seen.append((r, texts)) or torch.ones(len(r)))
    rows, prompts = rollout.load_prompts(cfg.data, tok, "plain", 64)
    from nanohuatuo.dist import Dist
    exp = ppo.make_experience(m, cfg, 0.0, prompts[:3], rows[:3], reward, None, tok, [EOS], stop, EOS, 0,
                              Dist(0, 1, torch.device("cpu")))
    # the answer cut by the length limit is scored closed by the end token too, as the RM was trained
    assert seen[0][0] == [[10, EOS], [10, 11, EOS], [10, 11, 14, EOS]] and seen[0][1][0] == "w3"
    assert exp.mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]] and exp.ended.tolist() == [True, True, False]
    assert exp.metrics["stop_string_rate"] == pytest.approx(1 / 3)


def test_reward_model_scores_in_units_of_their_spread():
    from nanohuatuo.dist import Dist
    d = Dist(0, 1, torch.device("cpu"))
    known = ScoreScale(0.0, 0.5)  # train_rm.py stored std 0.5: a score of 1 is two spreads
    assert known(torch.tensor([1.0, -0.5]), d).tolist() == [2.0, -1.0]
    released = ScoreScale()  # no statistics: bias and std from the first batch, then fixed
    first = released(torch.tensor([3.0, 5.0, 7.0, 9.0]), d)
    assert first.mean().item() == pytest.approx(0.0) and first.std(correction=0).item() == pytest.approx(1.0)
    assert (released.shift, released.scale) == (6.0, pytest.approx(math.sqrt(5.0)))
    assert released(torch.tensor([6.0]), d).tolist() == [0.0]
    # so a missing-EOS penalty of -1 means one spread below an average SFT answer on any reward model


def test_stop_after_and_resume_match_an_uninterrupted_run(tiny, tmp_path, capsys):
    base, sft = tiny
    kw = dict(adapter=sft, max_steps=3, save_every=10, adaptive_kl=True, kl_horizon=100, missing_eos_penalty=-1.0,
              critic="separate", sample_every=1)
    ppo.train(tiny_cfg(base, tmp_path / "full", **kw), reward_fn=good_fraction)
    part = ppo.train(tiny_cfg(base, tmp_path / "part", stop_after=2, **kw), reward_fn=good_fraction)
    assert part["stopped"] and not (tmp_path / "part" / "adapter_model.safetensors").exists()
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then killed mid-line
        f.write(json.dumps({"step": 3, "score": 9.0}) + "\n" + '{"step": 4, "sco')
    with pytest.raises(ValueError, match="lora_r=4.*lora_r=8"):  # the checkpoint's tensors would not fit
        ppo.train(tiny_cfg(base, tmp_path / "part", resume=True, **{**kw, "lora_r": 8}), reward_fn=good_fraction)
    ppo.train(tiny_cfg(base, tmp_path / "part", resume=True, **kw), reward_fn=good_fraction)
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    want = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per step
    for r, w in zip(rows, want):
        assert {k: v for k, v in r.items() if not k.endswith("_s") and k not in ("time", "tokens_per_s")} == \
            {k: v for k, v in w.items() if not k.endswith("_s") and k not in ("time", "tokens_per_s")}
    assert [json.loads(x)["step"] for x in open(tmp_path / "part" / "samples.jsonl")] == [1, 1, 2, 2, 3, 3]
    for name in ("adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/extra.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    # the critic, like the policy, is exported for the original base: SFT (+) critic, the trunk it was trained on
    from nanohuatuo.lora import load_adapter, merge_and_unload
    b = batch_for(base)
    on_base = Transformer.from_pretrained(base, adapter=str(tmp_path / "full" / "critic"))
    trained = merge_and_unload(Transformer.from_pretrained(base, adapter=sft))
    load_adapter(trained, tmp_path / "full" / "checkpoints" / "step_000003" / "critic")
    with torch.no_grad():
        torch.testing.assert_close(on_base.hidden_states(b.ids), trained.hidden_states(b.ids), atol=1e-5, rtol=0)
    assert json.load(open(tmp_path / "full" / "critic" / "adapter_config.json"))["r"] == 4 + 4
    # a changed learning rate or KL coefficient is applied from the checkpoint on, and said
    capsys.readouterr()
    again = ppo.train(tiny_cfg(base, tmp_path / "part", resume=True, **{**kw, "max_steps": 4, "lr": 1e-3,
                                                                      "kl_coef": 0.2}), reward_fn=good_fraction)
    said = capsys.readouterr().out
    assert "changed settings, applied from here on" in said and "lr 0.003 -> 0.001" in said
    assert again["lr"] == 1e-3 and again["history"][0]["kl_coef"] != want[-1]["kl_coef"]
    # a continuation refused (its checkpoint does not fit) leaves the finished outputs as they were
    with pytest.raises(ValueError, match="lora_r=4.*lora_r=8"):
        ppo.train(tiny_cfg(base, tmp_path / "part", resume=True, **{**kw, "max_steps": 6, "lora_r": 8}),
                  reward_fn=good_fraction)
    assert all((tmp_path / "part" / d / "adapter_config.json").exists() for d in ("", "critic"))
    # continued further and killed before its end: neither the policy nor the critic of step 4 looks finished
    ppo.train(tiny_cfg(base, tmp_path / "part", resume=True, **{**kw, "max_steps": 6, "stop_after": 5}),
              reward_fn=good_fraction)
    assert "critic/adapter_config.json removed" in capsys.readouterr().out
    assert not any((tmp_path / "part" / d / "adapter_config.json").exists() for d in ("", "critic"))


def test_length_debias_by_hand_and_it_holds_the_length(tiny, tmp_path):
    scores, lengths = torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([10, 20, 30, 40])
    x = lengths.float() - 25
    slope = float((x * (scores - 2)).sum() / (x * x).sum())  # least squares by hand: 30 / 500
    fixed, got = length_debias(scores, lengths, 1.0)
    assert got == pytest.approx(slope) and fixed.tolist() == pytest.approx((scores - slope * x).tolist())
    assert float((fixed - fixed.mean()) @ x) == pytest.approx(0.0, abs=1e-5)  # no length correlation left
    assert length_debias(scores, lengths, 0.0)[0] is scores
    # a scorer that pays for short answers: PPO shrinks them, unless the length is taken out of the score
    base, _ = tiny
    def short(prompts, responses, rows, texts):  # noqa: E306
        return torch.tensor([-len(r) / 8 for r in responses])
    kw = dict(max_steps=12, batch_size=32, max_new_tokens=8, micro_batch_size=32, lr=3e-3, kl_coef=0.0)
    free = ppo.train(tiny_cfg(base, tmp_path / "free", **kw), reward_fn=short)["history"]
    held = ppo.train(tiny_cfg(base, tmp_path / "held", length_debias=1.0, **kw), reward_fn=short)["history"]
    first = free[0]["response_length"]
    # about -1/8 per token (not exactly: an answer cut by the limit is scored with its end token appended)
    assert held[0]["response_length"] == first and -0.3 < held[0]["length_slope"] < -0.1
    assert free[-1]["response_length"] < first - 1.5, [r["response_length"] for r in free]
    assert abs(held[-1]["response_length"] - first) < 1, [r["response_length"] for r in held]
    assert all(r["score"] == pytest.approx(r["rm_score"], abs=1e-5) for r in held)  # the mean is kept


def test_k_answers_a_prompt_learn_from_their_lead_only(tiny, tmp_path):
    """--k 2: each answer's score counts only as its lead over the other answer to its prompt, so a
    per-prompt offset in the reward (what a reward model's level from prompt to prompt is) changes
    nothing PPO does; with one answer a prompt the same offset changes the whole run."""
    base, _ = tiny
    seen = []

    def offset(prompts, responses, rows, texts):  # the known reward plus 3 x the prompt's length
        seen.append([tuple(p) for p in prompts])
        return good_fraction(prompts, responses, rows, texts) + 3.0 * torch.tensor([len(p) for p in prompts])

    kw = dict(max_steps=3, batch_size=8, max_new_tokens=6, micro_batch_size=8, num_mini_batches=2, lr=3e-3)
    plain = ppo.train(tiny_cfg(base, tmp_path / "a", k=2, **kw), reward_fn=good_fraction)["history"]
    moved = ppo.train(tiny_cfg(base, tmp_path / "b", k=2, **kw), reward_fn=offset)["history"]
    assert all(len(s) == 16 and all(s[i] == s[i + 1] for i in range(0, 16, 2)) for s in seen)  # 8 prompts x 2
    assert len({s[0] for s in seen}) == 3  # each step its own prompts
    for a, b in zip(plain, moved):
        assert b["score"] > a["score"] + 3  # the offset is in the logged score...
        for h in (a, b):  # and in the logged objective, score - kl_coef * KL (the update sees the leads)
            assert h["reward"] == pytest.approx(h["score"] - h["kl_coef"] * h["kl"], abs=1e-5)
        for key in ("kl", "entropy", "response_length", "approx_kl", "vf_loss", "score_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key  # ...and nowhere in the update
    one = dict(kw, batch_size=16)
    plain1 = ppo.train(tiny_cfg(base, tmp_path / "c", **one), reward_fn=good_fraction)["history"]
    moved1 = ppo.train(tiny_cfg(base, tmp_path / "d", **one), reward_fn=offset)["history"]
    assert abs(moved1[-1]["kl"] - plain1[-1]["kl"]) > 1e-3  # k=1: the offsets drive the advantages
    with pytest.raises(ppo.UserError, match="--k 0"):
        tiny_cfg(base, tmp_path / "e", k=0).check()
