"""LoRA: merge/unmerge/disable exactness, export, PEFT file parity both ways, frozen base, bad files."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanohuatuo import Transformer
from nanohuatuo.hf import ModelDirError
from nanohuatuo.lora import (LoRALinear, apply_lora, disabled_adapters, load_adapter, lora_parameters,
                             merge_and_unload, merge_lora, save_adapter, unmerge_lora)

IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def randomise_lora_b(model, seed=1):
    """Nonzero B so the adapter changes the output (a fresh B is zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def lora_model(hf_dirs, kind="llama", **kw):
    path, _ = hf_dirs(kind)
    model = Transformer.from_pretrained(path)
    apply_lora(model, **kw)
    randomise_lora_b(model)
    return model.eval()


@torch.no_grad()
def test_merge_unmerge_and_disable(hf_dirs):
    path, _ = hf_dirs("llama")
    model = Transformer.from_pretrained(path)
    base_out = model(IDS)
    base_w = {n: p.clone() for n, p in model.state_dict().items()}
    names = apply_lora(model, r=4, alpha=8, dropout=0.1)
    assert len(names) == 2 * 7 and names[0] == "layers.0.self_attn.q_proj"
    randomise_lora_b(model)
    model.eval()
    out = model(IDS)
    assert (out - base_out).abs().max() > 1e-2  # the adapter matters
    with disabled_adapters(model):
        assert torch.equal(model(IDS), base_out)
    assert torch.equal(model(IDS), out)
    merge_lora(model)
    torch.testing.assert_close(model(IDS), out, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with disabled_adapters(model):
            pass
    unmerge_lora(model)
    for n, p in model.state_dict().items():
        if "lora_" not in n:
            torch.testing.assert_close(p, base_w[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS), out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_state_dict_names_export_and_extra(hf_dirs, tmp_path):
    path, _ = hf_dirs("qwen2")  # tied embeddings and q/k/v biases
    model = Transformer.from_pretrained(path)
    plain_keys = set(model.state_dict())
    base_out = model(IDS)
    model = lora_model(hf_dirs, "qwen2", r=4, alpha=8)
    out = model(IDS)
    # state dict keeps the plain names next to the LoRA weights, and round-trips
    sd = model.state_dict()
    assert {k for k in sd if "lora_" not in k} == plain_keys
    other = lora_model(hf_dirs, "qwen2", r=4, alpha=8)
    randomise_lora_b(other, seed=2)
    other.load_state_dict(sd)
    assert torch.equal(other(IDS), out)
    # save_pretrained of an unmerged LoRA model writes the base model
    model.save_pretrained(tmp_path / "base")
    assert torch.equal(Transformer.from_pretrained(tmp_path / "base")(IDS), base_out)
    # extra tensors ride along in their own file
    head = torch.randn(1, 32)
    save_adapter(model, tmp_path / "ad", extra={"value_head.weight": head})
    assert torch.equal(load_adapter(Transformer.from_pretrained(path), tmp_path / "ad")["value_head.weight"], head)
    save_adapter(model, tmp_path / "ad")
    assert load_adapter(Transformer.from_pretrained(path), tmp_path / "ad") == {}
    # merged export reloads as a plain model with the LoRA model's logits
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path / "merged")(IDS), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,targets", [
    ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("qwen2", ("q_proj", "v_proj", "down_proj")),
    ("bloom", ("query_key_value", "o_proj", "up_proj")),  # o_proj/up_proj are BLOOM's dense/dense_h_to_4h
])
@torch.no_grad()
def test_peft_loads_our_adapter(hf_dirs, tmp_path, kind, targets):
    from peft import PeftModel
    _, ref = hf_dirs(kind)
    model = lora_model(hf_dirs, kind, r=4, alpha=8, targets=targets)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if kind == "bloom":
        assert cfg["target_modules"] == ["dense", "dense_h_to_4h", "query_key_value"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path).eval()
    torch.testing.assert_close(model(IDS), peft_model(IDS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,rslora", [("llama", True), ("qwen2", False)])
@torch.no_grad()
def test_we_load_peft_adapter(hf_dirs, tmp_path, kind, rslora):
    from peft import LoraConfig, get_peft_model
    path, ref = hf_dirs(kind)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=rslora, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(ref), cfg)
    randomise_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    ours = Transformer.from_pretrained(path, adapter=tmp_path)
    assert not any(p.requires_grad for p in lora_parameters(ours))
    torch.testing.assert_close(ours(IDS), peft_model(IDS).logits, atol=1e-4, rtol=0)


def test_only_lora_gets_gradients(hf_dirs):
    model = lora_model(hf_dirs, "llama", r=4, targets=("q_proj", "down_proj")).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)} and len(trainable) == 8
    model(IDS).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == ("lora_" in name), name


def test_bf16_base_keeps_float32_lora(hf_dirs):
    path, _ = hf_dirs("llama")
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    apply_lora(model, r=4)
    randomise_lora_b(model)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    out = model(IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in lora_parameters(model))


def test_lora_term_casts_the_smaller_of_activations_and_adapter_weights():
    """bfloat16 activations: many rows (training, scoring) cast the float32 adapter weights to bfloat16;
    a decode step's few rows are cast to float32 instead, and the products run there."""
    torch.manual_seed(0)
    m = LoRALinear(torch.nn.Linear(64, 96).bfloat16(), r=8, alpha=16)
    torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    A, B = m.lora_A.weight, m.lora_B.weight
    for rows in (2, 64):  # 2 x 64 < 8 x (64 + 96) < 64 x 64
        x = torch.randn(rows, 64).bfloat16()
        if rows == 2:
            want = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), A) * m.scaling, B)
        else:
            want = torch.nn.functional.linear(torch.nn.functional.linear(x, A.bfloat16()) * m.scaling, B.bfloat16())
        got = m.delta(x)
        assert got.dtype == want.dtype and torch.equal(got, want), rows
        assert torch.equal(m(x), m.base(x) + want.to(torch.bfloat16))
    m.disabled = True
    assert m.delta(x) is None and torch.equal(m(x), m.base(x))


def test_bad_adapter_dirs(hf_dirs, tmp_path):
    path, _ = hf_dirs("llama")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(Transformer.from_pretrained(path), tmp_path)
    save_adapter(lora_model(hf_dirs, "llama", r=4), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({**tensors, key: torch.zeros(48, 5)}, weights)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{key}' has shape \(48, 5\)"):
        load_adapter(Transformer.from_pretrained(path), tmp_path)
    save_file({k: t for k, t in tensors.items() if k != key}, weights)
    with pytest.raises(ModelDirError, match=key):
        load_adapter(Transformer.from_pretrained(path), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="adapter_config.json: peft_type is 'IA3'"):
        load_adapter(Transformer.from_pretrained(path), tmp_path)
    with pytest.raises(ValueError, match="no linear layer matches targets.*gate_proj"):
        apply_lora(Transformer.from_pretrained(path), targets=("c_attn",))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["foo_proj"]}))
    with pytest.raises(ModelDirError, match=r"adapter_config.json: no linear layer matches targets \['foo_proj'\]"):
        load_adapter(Transformer.from_pretrained(path), tmp_path)


@pytest.mark.parametrize("arch, kw, want", [
    ("llama", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("baichuan", dict(qkv="packed"), ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("bloom", dict(qkv="bloom", mlp="gelu", norm="layer", pos="alibi", embed_norm=True),
     ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
])
def test_default_targets_cover_every_block_linear(arch, kw, want):
    from nanohuatuo import ModelConfig
    from nanohuatuo.lora import default_targets
    model = Transformer(ModelConfig(arch=arch, vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_dim=32, **kw))
    assert default_targets(model) == want
    n_linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("layers."))
    assert len(apply_lora(model, targets=default_targets(model))) == n_linear
    assert default_targets(model) == want  # the same names once wrapped
