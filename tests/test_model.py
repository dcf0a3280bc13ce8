"""The model against `transformers` on tiny random models of every family, and the weight I/O."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import TINY
from nanohuatuo import Transformer
from nanohuatuo.hf import ModelDirError
from nanohuatuo.model import alibi_slopes

FAMILIES = ["llama", "llama3", "mistral", "mistral_window", "qwen2", "qwen2_window", "qwen3", "qwen3_window", "bloom"]


def _ids(B=2, T=12, vocab=101, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_match_transformers(hf_dirs, kind):
    path, ref = hf_dirs(kind)
    ours = Transformer.from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 12, 101)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bloom"])
def test_left_padding_matches_transformers(hf_dirs, kind):
    path, ref = hf_dirs(kind)
    ours = Transformer.from_pretrained(path)
    ids = _ids(T=10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # first row left-padded by 4
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_save_pretrained_reloads_in_transformers(hf_dirs, kind, tmp_path):
    import transformers as tf
    path, ref = hf_dirs(kind)
    ours = Transformer.from_pretrained(path)
    ours.save_pretrained(tmp_path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    # and our own reload is exact
    again = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["Qwen2Config", "Qwen3Config"])
def test_a_qwen_window_on_every_layer_or_none_and_some_refused(tmp_path, family):
    """Qwen's use_sliding_window windows the layers from max_window_layers on: all of them (parity above), none
    of them (max_window_layers at least the depth: a plain model), or some, which is refused, not run wrong."""
    import transformers as tf
    torch.manual_seed(0)
    ids = _ids(T=12)
    for first, ok in ((2, True), (1, False)):
        cfg = getattr(tf, family)(**TINY, use_sliding_window=True, sliding_window=3, max_window_layers=first)
        ref = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        path = tmp_path / f"{family}-{first}"
        ref.save_pretrained(path)
        if not ok:
            with pytest.raises(ModelDirError, match=r"config.json: a sliding window on 1 of 2 layers"):
                Transformer.from_pretrained(path)
            continue
        ours = Transformer.from_pretrained(path)
        assert ours.config.sliding_window is None
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_sharded_save_and_load(hf_dirs, tmp_path):
    path, ref = hf_dirs("llama")
    ours = Transformer.from_pretrained(path)
    ours.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    again = Transformer.from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_bad_weights_name_the_tensor_and_file(hf_dirs, tmp_path):
    path, _ = hf_dirs("llama")
    sd = load_file(os.path.join(path, "model.safetensors"))
    cfg = open(os.path.join(path, "config.json")).read()

    def write(tensors, name):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        save_file(tensors, d / "model.safetensors")
        return d

    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelDirError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        Transformer.from_pretrained(write(missing, "missing"))
    extra = dict(sd, **{"model.layers.0.foo.weight": torch.zeros(2)})
    with pytest.raises(ModelDirError, match=r"model\.safetensors.*unexpected tensor 'model\.layers\.0\.foo\.weight'"):
        Transformer.from_pretrained(write(extra, "extra"))
    bad = dict(sd, **{"model.norm.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"model\.safetensors.*'model\.norm\.weight' has shape \(7,\)"):
        Transformer.from_pretrained(write(bad, "badshape"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nowhere")


def test_bf16_load_and_meta_free(hf_dirs):
    path, _ = hf_dirs("qwen2")
    m = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert m.lm_head.weight is m.embed_tokens.weight  # tied
    out = m(_ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- Baichuan

def _baichuan_from_llama(path, out, *, pos, vocab_size=None):
    """Write a Llama checkpoint in Baichuan's layout: q/k/v packed into W_pack."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    hf = json.load(open(os.path.join(path, "config.json")))
    new = {}
    for k, v in sd.items():
        if ".q_proj." in k:
            kk, vv = k.replace("q_proj", "k_proj"), k.replace("q_proj", "v_proj")
            new[k.replace("q_proj", "W_pack")] = torch.cat([v, sd[kk], sd[vv]])
        elif ".k_proj." in k or ".v_proj." in k:
            continue
        else:
            new[k] = v
    cfg = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": hf["vocab_size"],
           "hidden_size": hf["hidden_size"], "intermediate_size": hf["intermediate_size"],
           "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": hf["num_attention_heads"],
           "rms_norm_eps": hf["rms_norm_eps"], "hidden_act": "silu", "model_max_length": 128,
           "tie_word_embeddings": False, "position_embedding": pos}
    os.makedirs(out, exist_ok=True)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    save_file(new, os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory):
    # Baichuan has no grouped-query attention: a plain multi-head Llama is its split-QKV twin
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**dict(TINY, num_key_value_heads=4))
    model = tf.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("mha")
    model.save_pretrained(path)
    return str(path), model


def test_baichuan_rope_equals_llama(mha_llama, tmp_path):
    path, ref = mha_llama
    _baichuan_from_llama(path, tmp_path, pos="rope")
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.qkv == "packed" and ours.config.pos == "rope"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    # save writes W_pack back
    ours.save_pretrained(tmp_path / "out")
    keys = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert "model.layers.0.self_attn.W_pack.weight" in keys


def _reference_alibi_llama(sd, cfg, ids):
    """Direct computation of a Baichuan-13B-style model: Llama blocks with ALiBi, no RoPE."""
    H, L = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    d = cfg["hidden_size"]
    hd = d // H
    T = ids.shape[1]
    eps = cfg["rms_norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    # Baichuan builds slopes * arange(key) with a future mask; softmax ignores the per-row shift
    slopes = torch.tensor([(2 ** (-8 / H)) ** (i + 1) for i in range(H)]) if H & (H - 1) == 0 else None
    bias = slopes[:, None, None] * torch.arange(T)[None, None, :].float()
    bias = bias.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        qkv = h @ sd[p + "self_attn.W_pack.weight"].T
        q, k, v = qkv.split(d, -1)
        q, k, v = (t.view(*ids.shape, H, hd).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + bias
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(*ids.shape, d)
        x = x + y @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


def test_baichuan_alibi_matches_direct_computation(mha_llama, tmp_path):
    path, _ = mha_llama
    _baichuan_from_llama(path, tmp_path, pos="alibi")
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.pos == "alibi"
    sd = load_file(tmp_path / "model.safetensors")
    cfg = json.load(open(tmp_path / "config.json"))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _reference_alibi_llama(sd, cfg, ids), atol=1e-4, rtol=0)


def test_baichuan2_normhead(mha_llama, tmp_path):
    # NormHead: logits = h @ normalize(W)^T. Baichuan2 is recognised by its vocabulary size, so
    # check the head itself on a model config with that flag.
    path, ref = mha_llama
    _baichuan_from_llama(path, tmp_path, pos="rope")
    cfg = json.load(open(tmp_path / "config.json"))
    ours = Transformer.from_pretrained(tmp_path)
    ours.config.norm_head = True
    h = torch.randn(2, 3, cfg["hidden_size"])
    W = load_file(tmp_path / "model.safetensors")["lm_head.weight"]
    ours.lm_head.weight.data.copy_(F.normalize(W, dim=-1))
    torch.testing.assert_close(ours.logits(h), h @ F.normalize(W, dim=-1).T, atol=1e-5, rtol=0)
    # a trainable head is normalised in the forward pass so gradients respect the constraint
    ours.lm_head.weight.data.copy_(W)
    ours.lm_head.weight.requires_grad_(True)
    torch.testing.assert_close(ours.logits(h), h @ F.normalize(W, dim=-1).T, atol=1e-5, rtol=0)
    from nanohuatuo.hf import config_from_hf
    del cfg["position_embedding"]  # real Baichuan configs: the size says RoPE (7B) or ALiBi (13B)
    small = config_from_hf(dict(cfg, vocab_size=125696, hidden_size=4096))
    assert small.pos == "rope" and small.norm_head
    big = config_from_hf(dict(cfg, vocab_size=125696, hidden_size=5120))
    assert big.pos == "alibi" and big.norm_head


def test_alibi_slopes_non_power_of_two():
    # 40 heads (Baichuan2-13B): 32 geometric slopes then every other slope of the 64-head series
    s = alibi_slopes(40)
    base32, base64 = 2 ** (-8 / 32), 2 ** (-8 / 64)
    want = [base32 ** (i + 1) for i in range(32)] + [base64 ** (2 * i + 1) for i in range(8)]
    torch.testing.assert_close(s, torch.tensor(want), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- reward-model layout

def test_ziya_reward_model_layout(mha_llama, tmp_path):
    """model.* trunk + value_head (Linear with bias), no lm_head: HuatuoGPT-reward-model-7B's layout."""
    path, ref = mha_llama
    sd = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if not k.startswith("lm_head")}
    torch.manual_seed(0)
    sd["value_head.weight"], sd["value_head.bias"] = torch.randn(1, 32), torch.randn(1)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["LlamaRewardModel"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    save_file(sd, tmp_path / "model.safetensors")
    rm = Transformer.from_pretrained(tmp_path)
    assert rm.lm_head is None and rm.value_head is not None
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: the score is read at the last real token
    with torch.no_grad():
        hidden = ref.model(ids, attention_mask=mask).last_hidden_state
        last = mask.cumsum(1).argmax(1)
        want = (hidden[torch.arange(2), last] @ sd["value_head.weight"].T + sd["value_head.bias"]).squeeze(-1)
        got = rm.values(rm.hidden_states(ids, attention_mask=mask))[torch.arange(2), last]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    rm.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(sd)


def _rm_dir(mha_llama, d, head):
    """The Ziya layout with the given value_head tensors."""
    path, _ = mha_llama
    sd = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if not k.startswith("lm_head")}
    sd.update(head)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["LlamaRewardModel"]
    d.mkdir()
    json.dump(cfg, open(d / "config.json", "w"))
    save_file(sd, d / "model.safetensors")
    return d


def test_released_value_head_without_bias_gets_bias_zero(mha_llama, tmp_path):
    w = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    rm = Transformer.from_pretrained(_rm_dir(mha_llama, tmp_path / "nobias", {"value_head.weight": w}))
    assert torch.equal(rm.value_head.weight, w) and torch.equal(rm.value_head.bias, torch.zeros(1))
    # value_head=True on a directory that has a head keeps it, bias 0 too
    rm = Transformer.from_pretrained(tmp_path / "nobias", value_head=True)
    assert torch.equal(rm.value_head.weight, w) and torch.equal(rm.value_head.bias, torch.zeros(1))


def test_released_reward_model_without_head_weight_is_an_error(mha_llama, tmp_path):
    with pytest.raises(ModelDirError, match=r"'value_head\.weight' is missing .*model\.safetensors.*LlamaRewardModel"):
        Transformer.from_pretrained(_rm_dir(mha_llama, tmp_path / "nohead", {}))
    with pytest.raises(ModelDirError, match=r"'value_head\.weight' is missing .*bias without its weight"):
        Transformer.from_pretrained(_rm_dir(mha_llama, tmp_path / "biasonly", {"value_head.bias": torch.ones(1)}))


def test_fresh_value_head_on_an_lm(hf_dirs):
    path, _ = hf_dirs("llama")
    m = Transformer.from_pretrained(path, value_head=True)
    assert m.value_head.weight.dtype == torch.float32 and torch.equal(m.value_head.bias, torch.zeros(1))
    assert m.value_head.weight.abs().sum() > 0 and m.lm_head is not None


def _copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_bad_directories_name_file_and_key(hf_dirs, tmp_path):
    from nanohuatuo.hf import MissingFileError, check_model_dir
    path, _ = hf_dirs("llama")
    cfg = json.load(open(os.path.join(path, "config.json")))

    def with_config(name, text):
        d = _copy_dir(path, tmp_path / name)
        (d / "config.json").write_text(text)
        return d

    with pytest.raises(ModelDirError, match=r"config\.json: not valid JSON"):
        Transformer.from_pretrained(with_config("badjson", "{not json"))
    lacking = dict(cfg)
    del lacking["hidden_size"]
    with pytest.raises(ModelDirError, match=r"config\.json: missing key 'hidden_size', which a llama config needs"):
        Transformer.from_pretrained(with_config("nokey", json.dumps(lacking)))
    with pytest.raises(ModelDirError, match=r"config\.json: model_type 'gpt9' is not supported \(supported: llama.*bloom"):
        Transformer.from_pretrained(with_config("unknown", json.dumps(dict(cfg, model_type="gpt9"))))
    with pytest.raises(ModelDirError, match=r"config\.json: hidden_size is '32'; it must be a positive integer"):
        Transformer.from_pretrained(with_config("strsize", json.dumps(dict(cfg, hidden_size="32"))))
    d = _copy_dir(path, tmp_path / "noconfig")
    os.remove(d / "config.json")
    with pytest.raises(MissingFileError, match=r"config\.json not found"):
        Transformer.from_pretrained(d)
    d = _copy_dir(path, tmp_path / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelDirError, match=r"model\.safetensors: truncated safetensors file"):
        Transformer.from_pretrained(d)
    with pytest.raises(ModelDirError, match=r"truncated"):
        check_model_dir(d)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(ModelDirError, match=r"model\.safetensors: truncated or not a safetensors file"):
        Transformer.from_pretrained(d)
    d = _copy_dir(path, tmp_path / "notok")
    with pytest.raises(MissingFileError, match=r"no tokenizer \(tokenizer\.json or tokenizer\.model\)"):
        check_model_dir(d, tokenizer=True)
    assert check_model_dir(d).dim == 32
