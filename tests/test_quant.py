"""Tests for the NF4 (QLoRA) base: codes and packing by hand and against bitsandbytes' bytes, the
round-trip error, NF4Linear against F.linear, and one QLoRA step of SFT, the reward model and PPO.
"""

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_base, word_tokenizer, write_jsonl

from nanohuatuo import ppo, reward, sft
from nanohuatuo.lora import LoRALinear, apply_lora, lora_modules, merge_and_unload, save_adapter
from nanohuatuo.model import ModelConfig, Transformer
from nanohuatuo.quant import (NF4_CODE, NF4Linear, absmax_dequantize, absmax_quantize, nf4_dequantize, nf4_quantize,
                              quantize)
from nanohuatuo.reward_model import load_reward_model, score_texts
from nanohuatuo.sft import SFTLoss

# bitsandbytes 0.50.2, functional.quantize_4bit(W.view(10, 15), blocksize=64, quant_type="nf4") of W below
BNB_W = torch.sin(torch.arange(150.0) * 0.37) * torch.tensor([1.0, 3.0, 0.5]).repeat_interleave(64)[:150]
BNB_PACKED = bytes.fromhex(
    "7befffed9521000137befffed9521000137befffed9521000137befffed9521000147befffec9521000147cefffec952100014"
    "8cefffec9521000148cefffec9521000148cefffec942100")
BNB_ABSMAX = [0.9975263476371765, 2.9972152709960938, 0.49967098236083984]


# ----------------------------------------------------------------------------- codes, blocks, packing

def test_nf4_codes_and_packing_by_hand():
    # block 4: absmax 2 -> normalised [1, -0.5, 0.05, 0]; nearest codes 15 (1.0), 2 (-0.525: closer than
    # -0.395), 8 (0.0796: 0.05 is past the midpoint 0.0398), 7 (0.0); the second block [-3, 3, 1.5, -0.3]
    # -> [-1, 1, 0.5, -0.1]: codes 0, 15, 12 (0.4407 vs 0.5626: midpoint 0.5017), 6 (-0.0911)
    w = torch.tensor([[2.0, -1.0, 0.1, 0.0], [-3.0, 3.0, 1.5, -0.3]])
    packed, absmax = nf4_quantize(w, block=4)
    assert absmax.tolist() == [2.0, 3.0]
    assert packed.dtype == torch.uint8 and packed.tolist() == [15 << 4 | 2, 8 << 4 | 7, 0 << 4 | 15, 12 << 4 | 6]
    want = torch.stack([NF4_CODE[[15, 2, 8, 7]] * 2, NF4_CODE[[0, 15, 12, 6]] * 3])
    assert torch.equal(nf4_dequantize(packed, absmax, (2, 4)), want)
    # an all-zero block stores absmax 0 and the zero code, and comes back as zeros
    packed, absmax = nf4_quantize(torch.zeros(8), block=4)
    assert absmax.tolist() == [0.0, 0.0] and packed.tolist() == [0x77] * 4
    assert torch.equal(nf4_dequantize(packed, absmax, (8,)), torch.zeros(8))


def test_bytes_match_bitsandbytes():
    packed, absmax = nf4_quantize(BNB_W.view(10, 15))  # 150 values: the last block of 64 is padded
    assert packed.numel() == 96 and bytes(packed[:75].tolist()) == BNB_PACKED
    assert absmax.tolist() == BNB_ABSMAX
    assert packed[75:].tolist() == [0x77] * 21  # the padding is zeros


def test_round_trip_error_is_within_half_a_code_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * 0.02
    w[3, :64] = 0.0  # a zero block inside a row
    packed, absmax = nf4_quantize(w)
    back = nf4_dequantize(packed, absmax, w.shape)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2  # 0.1519, between -1.0 and -0.6962
    per_value_absmax = absmax.repeat_interleave(64)[:w.numel()].view(w.shape)
    assert ((back - w).abs() <= half_gap * per_value_absmax + 1e-7).all()
    assert torch.equal(back[3, :64], torch.zeros(64))
    assert (back - w).abs().mean() < 0.06 * w.abs().max()  # on average far inside the bound


def test_double_quantised_absmax():
    g = torch.Generator().manual_seed(1)
    absmax = torch.rand(600, generator=g) * 0.1 + 0.05  # 600: the last of three blocks of 256 is short
    q, scale, mean = absmax_quantize(absmax)
    assert q.dtype == torch.int8 and q.shape == (600,) and scale.shape == (3,)
    back = absmax_dequantize(q, scale, mean)
    assert ((back - absmax).abs() <= scale.repeat_interleave(256)[:600] / 2 + 1e-7).all()


# ----------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_is_f_linear_with_the_dequantised_weight(double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = NF4Linear(lin, double_quant=double_quant)
    assert not any(p.requires_grad for p in q.parameters())
    x = torch.randn(3, 5, 96, requires_grad=True)
    w = q.dequantize()
    assert w.shape == (40, 96) and (w - lin.weight).abs().max() < 0.152 * lin.weight.abs().max()
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), atol=1e-6, rtol=0)
    # the gradient reaches the input through the same weight; the base takes none
    (g,) = torch.autograd.grad((y * torch.arange(40.0)).sum(), x)
    torch.testing.assert_close(g, (torch.arange(40.0) @ w).expand(3, 5, 96), atol=1e-5, rtol=0)
    # 4.125 (or 4.127) bits per weight instead of 32
    n_bytes = sum(b.numel() * b.element_size() for b in q.buffers())
    assert n_bytes == 96 * 40 // 2 + (60 + 4 + 4 if double_quant else 60 * 4)


def test_lora_on_an_nf4_base_trains_only_the_adapter():
    torch.manual_seed(0)
    lora = LoRALinear(NF4Linear(nn.Linear(64, 32)), r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(2, 64)
    want = lora.base(x) + lora.lora_B(lora.lora_A(x)) * 2.0
    torch.testing.assert_close(lora(x), want, atol=1e-6, rtol=0)
    lora(x).sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    with pytest.raises(RuntimeError, match="4-bit"):
        lora.merge()


# ----------------------------------------------------------------------------- QLoRA stages on tiny models

TEXTS = ["头疼怎么办", "多喝水，注意休息。", "建议到医院检查。", "User: Assistant:", "及时就医"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("qbase"), TEXTS * 3, vocab_size=290, n_kv_heads=2, max_seq_len=128).dir


def test_from_pretrained_quantises_the_blocks_only(base):
    model = Transformer.from_pretrained(base, quant="nf4")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    assert {k for n, k in kinds.items() if n.startswith("layers.")} == {"NF4Linear"} and len(kinds) == 15
    assert kinds["lm_head"] == "Linear"  # the losses read its weight: kept in the compute dtype
    ids = torch.tensor([[1, 5, 9, 30, 60, 7]])
    with torch.no_grad():  # close to the full-precision model, not equal
        full, q = Transformer.from_pretrained(base)(ids), model(ids)
    assert 0 < (full - q).abs().max() < 0.1 * full.abs().max()
    with pytest.raises(ValueError, match="nf4-quantised"):
        model.save_pretrained(base + "_copy")
    assert quantize(Transformer.from_pretrained(base), "none") == 0


def test_qlora_sft_step_changes_only_the_lora_weights(base):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(base, quant="nf4")
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    model.grad_checkpointing = True
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("q_proj.base.packed") for k in before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 5, 9, 30, 60, 7, 11, 2]])
    for _ in range(2):  # B is 0 at first, so A moves from the second step on
        opt.zero_grad()
        SFTLoss(model)(ids, ids.roll(-1, 1)).backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith((".lora_A.weight", ".lora_B.weight"))} and len(changed) == 28


def test_qlora_sft_cli_writes_an_adapter_for_the_full_base(tmp_path, base):
    rows = [{"messages": [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1 + i % 2]}],
             "source": "test", "id": str(i)} for i in range(8)]
    data, out = write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out"
    assert sft.main(["--model", base, "--data", data, "--out", str(out), "--quant", "nf4", "--lora-r", "4",
                     "--max-steps", "2", "--batch-size", "4", "--eval-frac", "0", "--lr", "2e-4", "--template", "plain",
                     "--grad-checkpointing", "--save-merged", "--device", "cpu"]) == 0
    tuned = Transformer.from_pretrained(base, adapter=out)  # the adapter loads on the full-precision base
    merged = Transformer.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 5, 9, 30, 60, 7]])
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids), merged(ids), atol=1e-5, rtol=0)
        assert not torch.equal(tuned(ids), Transformer.from_pretrained(base)(ids))


def test_qlora_reward_model_trains_and_loads_in_4_bits(tmp_path, base):
    prefs = [{"id": f"p{i}", "prompt": TEXTS[0], "answers": [TEXTS[4] + TEXTS[1], TEXTS[2]]} for i in range(8)]
    data = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    cfg = reward.RMConfig(model=base, data=[data], out=str(tmp_path / "rm"), template="plain", lora_r=4, lr=3e-3,
                          eval_frac=0.25, max_steps=2, batch_size=2, quant="nf4", device="cpu", seed=0)
    reward.train(cfg)
    rm = load_reward_model(cfg.out, device="cpu", quant="nf4")
    assert isinstance(rm.model.layers[0].self_attn.q_proj.base, NF4Linear)
    full = load_reward_model(cfg.out, device="cpu")  # the same adapter on the full-precision base
    a, b = score_texts(rm, [TEXTS[0]], [TEXTS[2]]), score_texts(full, [TEXTS[0]], [TEXTS[2]])
    assert torch.isfinite(a).all() and (a - b).abs().max() < 1.0


def test_qlora_ppo_step_with_a_merged_sft_adapter(tmp_path):
    words = ["<unk>", "<s>", "</s>", "<pad>", "User:", "Assistant:"] + [f"w{i}" for i in range(26)]
    d = tmp_path / "base"
    d.mkdir()
    word_tokenizer(d, words)
    model = Transformer(ModelConfig(arch="llama", vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=64, max_seq_len=64))
    model.init_weights(std=0.1, seed=0)
    model.save_pretrained(d)
    torch.manual_seed(0)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.3)
    model.source_dir = str(d)
    save_adapter(model, tmp_path / "sft")
    write_jsonl(d / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}]} for i in range(8)])
    cfg = ppo.PPOConfig(model=str(d), adapter=str(tmp_path / "sft"), data=str(d / "prompts.jsonl"),
                        out=str(tmp_path / "ppo"), template="plain", max_steps=1, batch_size=4, max_new_tokens=4,
                        micro_batch_size=4, lora_r=4, lora_alpha=8, sample_every=0, missing_eos_penalty=None,
                        quant="nf4", grad_checkpointing=True, save_merged=True, device="cpu")
    m = ppo.build_models(cfg, device="cpu", dtype=torch.float32)
    assert isinstance(m.model.layers[0].self_attn.q_proj.base, NF4Linear) and m.sft is not None
    summary = ppo.train(cfg, reward_fn=lambda p, r, rows, t: torch.tensor([len(x) / 4.0 for x in r]))
    assert summary["steps"] == 1
    # the export is SFT (+) PPO for the full-precision base; --save-merged merged it there
    tuned = Transformer.from_pretrained(str(d), adapter=cfg.out)
    merged = Transformer.from_pretrained(os.path.join(cfg.out, "merged"))
    ids = torch.tensor([[1, 5, 9, 30, 6]])
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids), merged(ids), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "ppo" / "adapter_config.json").read_text())["r"] == 8  # 4 SFT + 4 PPO


def test_bad_quant_settings_are_one_line_and_exit_2(tmp_path, base, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}])
    common = ["--model", base, "--data", data, "--device", "cpu"]
    assert sft.main(common + ["--out", str(tmp_path / "a"), "--quant", "nf4", "--lora-r", "0"]) == 2
    assert "--quant nf4 freezes the base weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sft.main(common + ["--out", str(tmp_path / "b"), "--quant", "int3"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert reward.main(common + ["--out", str(tmp_path / "c"), "--quant", "nf4", "--lora-r", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs LoRA" in err
    model = Transformer.from_pretrained(base, quant="nf4")
    apply_lora(model, r=2)
    with pytest.raises(RuntimeError, match="4-bit"):
        merge_and_unload(model)
