"""Weight formats for CPU decoding: float32, bfloat16 and int8 (quant.Int8Linear's kernels).

The end-to-end checks run on a model whose greedy tokens are well separated by construction: the
output head is a permutation of the (unit-scale) embeddings and the blocks are small, so the next
token after t is perm[t] by a wide logit margin, and every format must produce exactly that chain.
A random model's near-ties would flip under bfloat16 rounding; the layer-level checks compare the
numerics themselves, to bfloat16's tolerance.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import bench_module, tiny_base
import nanohuatuo.cpu_int8 as cpu_int8
import nanohuatuo.cpu_kernels as ck
import nanohuatuo.cpu_reduction as cpu_reduction
from nanohuatuo.cpu_kernels import head_logits, tune_cpu_kernels
from nanohuatuo.engine import Engine, SamplingParams
from nanohuatuo.engine_runner import decode_logits
from nanohuatuo.lora import apply_lora, lora_parameters, merge_lora
from nanohuatuo.model import ModelConfig, Transformer
from nanohuatuo.quant import Int8Linear, int8pack_fits, quantize_int8

V = 128
PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [13]]


def chain_model(dtype=torch.float32, int8=False, kernel=None, ffn_dim=128, lora_r=0, qkv_bias=False):
    """A tiny llama whose greedy next token after t is PERM[t] (see the module docstring); with
    `lora_r`, every projection wrapped in a small non-zero LoRA first, as the RL policy is; with
    `qkv_bias`, q, k and v have small non-zero biases (as Qwen2's)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=ffn_dim, max_seq_len=64, qkv_bias=qkv_bias))
    m.init_weights(seed=0)  # blocks at std 0.02: small next to unit-scale embeddings
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(V, generator=g)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.02, generator=g)
        m.embed_tokens.weight.copy_(torch.randn(V, 64, generator=g))
        head = torch.empty_like(m.embed_tokens.weight)
        head[perm] = m.embed_tokens.weight  # row perm[t] is t's embedding: the largest dot product
        m.lm_head.weight = torch.nn.Parameter(head)
    m.to(dtype).eval()
    if int8:
        quantize_int8(m)
    if lora_r:
        apply_lora(m, r=lora_r, alpha=2 * lora_r, dropout=0.0, targets="all-linear")
        with torch.no_grad():
            for p in lora_parameters(m):
                p.normal_(0, 0.05, generator=g)
    tune_cpu_kernels(m, batches=(1, len(PROMPTS)))
    if kernel is not None:
        for layer in int8_layers(m):
            layer.rows_kernel = None  # this kernel at any number of rows
            if kernel.startswith("dequant") or int8pack_fits(layer):
                layer.kernel = kernel
    return m, perm.tolist()


def int8_layers(m):
    """The int8 layers a decode step of `m` runs: the model's own, but q|k|v and gate|up fused (cpu_int8.FusedInt8)."""
    fused, parts = [], set()
    for layer in m.layers:
        a, f = layer.self_attn, layer.mlp
        for owner, group in ((a, (a.q_proj, a.k_proj, a.v_proj)), (f, (f.gate_proj, f.up_proj))):
            if type(owner.fused) is cpu_int8.FusedInt8:
                fused.append(owner.fused.layer)
                parts |= {id(p) for p in group}
    return [x for x in m.modules() if isinstance(x, Int8Linear) and id(x) not in parts] + fused


def greedy(m, n=10):
    return [o.tokens for o in Engine(m, slots=len(PROMPTS)).generate(PROMPTS, SamplingParams(max_new_tokens=n))]


def expected(perm, n=10):
    out = []
    for p in PROMPTS:
        t, row = p[-1], []
        for _ in range(n):
            t = perm[t]
            row.append(t)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- int8 kernels, one layer

def int8_layer(n_in=64, n_out=96, dtype=torch.float32):
    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.bias.normal_()
    return Int8Linear(lin.to(dtype))


def test_int8pack_matches_the_dequantising_path_to_bfloat16_rounding():
    layer = int8_layer()
    assert int8pack_fits(layer) and layer.kernel == "dequant"
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    xb = x.bfloat16().float()  # the inputs the bfloat16 kernel sees
    want = layer.dequant(xb)
    got = layer.int8pack(x, torch.bfloat16)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 96)
    # the same int8 products; bfloat16 scales and one bfloat16 rounding of the output: < 2^-7 relative
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    # float32 activations through _weight_int8pack_mm: float32's rounding only
    torch.testing.assert_close(layer.int8pack(x, torch.float32), layer.dequant(x), rtol=1e-5, atol=1e-4)
    # the forward with that kernel is int8pack plus the bias; the default stays the dequantising path
    with torch.no_grad():
        assert torch.equal(layer(x), layer.dequant(x) + layer.bias)
        layer.kernel = "int8pack_bf16"
        assert torch.equal(layer(x), got + layer.bias)


def test_int8pack_in_bfloat16():
    layer = int8_layer(dtype=torch.bfloat16)
    assert layer.scales.dtype == torch.bfloat16
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    want, got = layer.dequant(x).float(), layer.int8pack(x, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # the dequantising path rounds twice (product, then times the scale), int8pack once
    torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=2 ** -6 * want.abs().max().item())


def test_dequant_in_bfloat16_is_a_bfloat16_model_s_dequantising_product():
    """"dequant_bf16": float32 activations cast to bfloat16 for the product a bfloat16 model's int8
    layer computes (the int8 weight is exact in bfloat16), the result cast back."""
    layer = int8_layer()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    got = layer.product(x, "dequant_bf16")
    assert got.dtype == torch.float32
    want = (torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16()) * layer.scales.bfloat16()).float()
    assert torch.equal(got, want)
    ref = layer.dequant(x.bfloat16().float())  # two bfloat16 roundings (the product, the scale) from it
    torch.testing.assert_close(got, ref, rtol=2 ** -6, atol=2 ** -6 * ref.abs().max().item())


def test_a_prompt_s_many_rows_take_the_kernel_timed_for_them(monkeypatch):
    """Tuning times each int8 shape's kernel for a prompt's many rows too (cpu_int8.measure_rows:
    compute-bound there, where the decode's kernels were chosen for reading the weight); a layer
    runs it from ROWS_FROM rows on. A 40-token prompt's prefill takes the rows kernel, the decode
    steps their own, and the chain model's greedy tokens are the expected ones."""
    m, perm = chain_model(int8=True)
    names = {"dequant", "dequant_bf16", "int8pack", "int8pack_bf16"}
    assert set(m.cpu_kernels["int8_rows"]) == set(m.cpu_kernels["int8"])
    assert set(m.cpu_kernels["int8_rows"].values()) <= names
    layers = int8_layers(m)
    assert all(x.rows_kernel == m.cpu_kernels["int8_rows"][(x.out_features, x.in_features)] for x in layers)
    for x in layers:
        x.kernel, x.rows_kernel = "dequant", "dequant_bf16"
    ran, product = [], Int8Linear.product
    monkeypatch.setattr(Int8Linear, "product", lambda self, x, kernel: ran.append((x.numel() // x.shape[-1], kernel))
                        or product(self, x, kernel))
    prompt = [int(t) for t in torch.randperm(V, generator=torch.Generator().manual_seed(5))[:40]]
    out = Engine(m, slots=1).generate([prompt], SamplingParams(max_new_tokens=6))[0].tokens
    want, t = [], prompt[-1]
    for _ in range(6):
        t = perm[t]
        want.append(t)
    assert out == want
    assert {k for rows, k in ran if rows >= cpu_int8.ROWS_FROM} == {"dequant_bf16"}
    assert {k for rows, k in ran if rows < cpu_int8.ROWS_FROM} == {"dequant"}
    assert (len(prompt) - 1, "dequant_bf16") in ran and (1, "dequant") in ran  # the last token is the first step's


def test_the_rows_kernel_drops_what_disagrees_and_what_starts_slow(monkeypatch):
    """measure_rows keeps only kernels within bfloat16 rounding of the dequantising one, and does not
    time further a kernel whose first timed call took over 4 times the quickest one's."""
    import types
    layer, product, calls, clock = int8_layer(), Int8Linear.product, [], [0.0]

    def product_(self, x, kernel):
        calls.append(kernel)
        # a clock the calls advance, not the machine's: a busy machine made the real one flaky here
        clock[0] += 100.0 if kernel == "int8pack" and calls.count(kernel) == 2 else 1.0  # slow at its first timed call
        return product(self, x, kernel) * (-1 if kernel == "int8pack_bf16" else 1)  # wrong values: dropped

    monkeypatch.setattr(cpu_int8, "_MEASURED", {})
    monkeypatch.setattr(cpu_int8, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(Int8Linear, "product", product_)
    monkeypatch.setattr(cpu_int8, "seconds", lambda fn, rounds=3: [fn(), 1.0][1])
    assert int8pack_fits(layer)
    assert cpu_int8.measure_rows(layer, torch.float32) in ("dequant", "dequant_bf16")
    # each checked once (its warm-up), then timed once if it was right, then timed on if it was quick
    assert calls == ["dequant", "dequant", "dequant_bf16", "dequant_bf16", "int8pack", "int8pack", "int8pack_bf16",
                     "dequant", "dequant_bf16"]


def test_layers_the_op_cannot_take_keep_the_dequantising_path():
    assert not int8pack_fits(int8_layer(n_in=48))  # in-features no multiple of 32
    noncontiguous = int8_layer()
    noncontiguous.weight = noncontiguous.weight.t().contiguous().t()
    assert not int8pack_fits(noncontiguous)
    # a whole model: the (64, 48) down projection keeps "dequant" whatever the timings say
    m, _ = chain_model(int8=True, ffn_dim=48)
    assert m.cpu_kernels["int8"][(64, 48)] == "dequant" == m.layers[0].mlp.down_proj.kernel
    # o (64, 64), q|k|v fused (64 + 32 + 32, 64), gate|up fused (2 * 48, 64), down (64, 48), the head
    assert set(m.cpu_kernels["int8"]) == {(64, 64), (128, 64), (96, 64), (64, 48), (V, 64)}
    kinds = {layer.kernel for layer in int8_layers(m)}
    assert kinds <= {"dequant", "int8pack", "int8pack_bf16"}
    assert m.layers[0].mlp.up_proj.weight.dtype == torch.int8  # the int8 bytes are what is kept


def test_int8_qkv_and_gate_up_fused_into_one_matrix_each():
    """Tuning an int8 model fuses q|k|v and gate|up (cpu_int8.FusedInt8): the parts' weights, scales and
    biases become views of the fused rows (same state dict, no extra bytes), the fused product is the
    parts' products side by side, and a part whose weight was replaced makes the block run the parts."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="qwen2", vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=96, max_seq_len=64, qkv_bias=True))
    m.init_weights(seed=0)
    quantize_int8(m.eval())
    before, nbytes = {k: v.clone() for k, v in m.state_dict().items()}, bench_module("generate").read_bytes(m)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.inference_mode():
        plain = m(ids)
    tune_cpu_kernels(m, batches=(1, 4))
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert type(attn.fused) is type(mlp.fused) is cpu_int8.FusedInt8
    assert attn.fused.layer.weight.shape == (64 + 32 + 32, 64) and mlp.fused.layer.weight.shape == (2 * 96, 64)
    after = m.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.fused.layer.weight.untyped_storage().data_ptr()
    assert attn.v_proj.bias.untyped_storage().data_ptr() == attn.fused.layer.bias.untyped_storage().data_ptr()
    assert bench_module("generate").read_bytes(m) == nbytes  # the parts are views: no bytes counted twice
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for kernel in ("dequant", "int8pack"):  # float32 activations (the timing may have chosen bfloat16 ones)
            for layer in int8_layers(m) + [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]:
                layer.kernel = kernel
            torch.testing.assert_close(torch.cat(attn.fused(x, (attn.q_proj, attn.k_proj, attn.v_proj)), -1),
                                       torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1), atol=1e-5, rtol=0)
        torch.testing.assert_close(m(ids), plain, atol=1e-4, rtol=0)
        calls = []
        fused_call = cpu_int8.KernelInt8Linear.forward
        for owner in (attn, mlp):
            owner.fused.layer.forward = lambda x, layer=owner.fused.layer: calls.append(1) or fused_call(layer, x)
        m(ids)
        assert len(calls) == 2
        mlp.up_proj.weight = mlp.up_proj.weight.clone()  # no longer the fused rows: gate and up run alone
        calls.clear()
        torch.testing.assert_close(m(ids), plain, atol=1e-4, rtol=0)
        assert len(calls) == 1


# ----------------------------------------------------------------------------- the engine in each format

def test_every_format_decodes_the_same_well_separated_tokens(monkeypatch):
    ref, perm = chain_model()
    want = expected(perm)
    assert greedy(ref) == want
    calls = []
    pack = Int8Linear.int8pack
    monkeypatch.setattr(Int8Linear, "int8pack", lambda self, x, dtype: calls.append(dtype) or pack(self, x, dtype))
    for dtype, int8, kernel in [(torch.bfloat16, False, None), (torch.float32, True, "dequant"),
                                (torch.float32, True, "int8pack_bf16"), (torch.float32, True, "int8pack"),
                                (torch.bfloat16, True, "dequant"), (torch.bfloat16, True, "int8pack")]:
        m, _ = chain_model(dtype, int8, kernel)
        calls.clear()
        assert greedy(m) == want, (dtype, int8, kernel)
        wanted = {"int8pack_bf16": {torch.bfloat16}, "int8pack": {dtype}}.get(kernel, set())
        assert set(calls) == wanted, (dtype, kernel)  # the engine ran the kernel it was given


@pytest.mark.parametrize("where", ["compiled", "eager"])
def test_int8_layers_through_the_compilers_reduction_decode_the_same_tokens(monkeypatch, where):
    """An int8 model on CPU. Compiled: every int8 product is one opaque op running its measured kernel
    (inductor could not lower _weight_int8pack_mm fed by a fused cast, and such a step fell back to
    eager decoding), and at batch 1 the compiler's reduction with the scales where it was timed
    faster (here chosen whatever the timing); rows joining and leaving take both graphs. Eager, a
    one-slot engine: one-row products through the reduction compiled alone (the size floor lowered),
    as timed, so the steps compile nothing more (q|k|v has a bias, which the timing must pass too).
    The chain model's well-separated greedy tokens either way, and the reduction really ran."""
    from torch._dynamo.utils import counters
    if cpu_reduction.product_kernel() is None:
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler)")
    monkeypatch.setenv("NANOHUATUO_CPU_KERNELS", "fixed")
    m, perm = chain_model(int8=True, qkv_bias=True)
    monkeypatch.delenv("NANOHUATUO_CPU_KERNELS")
    monkeypatch.setattr(cpu_int8, "_MEASURED", {})
    monkeypatch.setattr(cpu_reduction, "EAGER_MIN_BYTES", 0)
    measure, reduced, product = ck.measure_int8, [], cpu_reduction.product_kernel()
    monkeypatch.setattr(ck, "measure_int8", lambda layer, dtype, batches, compiled=False, head=False:
                        (measure(layer, dtype, batches, compiled, head)[0], True))
    reduction = cpu_int8.reduction
    monkeypatch.setattr(cpu_int8, "reduction", lambda *a: reduced.append("traced") or reduction(*a))
    monkeypatch.setattr(cpu_reduction, "product_kernel", lambda: lambda *a: reduced.append("called") or product(*a))
    m.cpu_kernels, compiled = None, where == "compiled"
    slots = len(PROMPTS) if compiled else 1
    tune_cpu_kernels(m, batches=(1, slots), compiled=compiled)
    reduced.clear()  # the timing's calls: only the steps' count
    layers = int8_layers(m)  # per block o, down, q|k|v and gate|up; the head
    assert len(layers) == 9 and all(type(x) is cpu_int8.KernelInt8Linear for x in layers)
    assert all(x.reduce == compiled and x.reduce_eager == (not compiled) for x in layers)
    lengths = [3, 10, 6, 8]
    eng = Engine(m, slots=slots, compile=compiled)
    graphs = counters["stats"]["unique_graphs"]
    rids = [eng.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]
    outs = {}
    while eng.has_work():
        for ev in eng.step():
            outs.setdefault(ev.rid, []).append(ev.token)
    assert [outs[r] for r in rids] == [row[:n] for row, n in zip(expected(perm), lengths)]
    assert eng.compile == compiled and set(reduced) == {"traced" if compiled else "called"}
    assert compiled or counters["stats"]["unique_graphs"] == graphs  # eagerly: nothing compiled at the steps


def test_int8pack_greedy_equals_the_dequantising_greedy():
    fallback, _ = chain_model(int8=True, kernel="dequant")
    packed, _ = chain_model(int8=True, kernel="int8pack_bf16")
    assert greedy(packed, 16) == greedy(fallback, 16)


@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float32])
def test_bfloat16_engine_keeps_the_measured_cache_dtype_and_float32_logits(monkeypatch, kv):
    """A bfloat16 model's keys and values stay in the dtype whose attention was timed faster (float32
    where there is room for the wider cache); the logits are float32 either way."""
    import nanohuatuo.engine as engine
    monkeypatch.setattr(ck, "_measure_kv", lambda c, dtype, batches: kv)
    m, perm = chain_model(torch.bfloat16)
    assert m.cpu_kernels["kv_dtype"] == kv
    eng = Engine(m, slots=2)
    assert eng.dtype == torch.bfloat16 and eng.k[0].dtype == eng.v[0].dtype == kv
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    with torch.inference_mode():
        logits = decode_logits(m, torch.tensor([3, 5]), torch.tensor([0, 0]), eng.k, eng.v, 1)
    assert logits.dtype == torch.float32 and logits.argmax(-1).tolist() == [perm[3], perm[5]]
    assert greedy(m) == expected(perm)  # prefills (batched, right-padded) and decode steps through that cache
    monkeypatch.setattr(engine, "room_for", lambda nbytes: False)
    assert Engine(m, slots=2).k[0].dtype == torch.bfloat16  # no room for a float32 cache: the model's dtype
    # the head's measured kernel and the plain head give the same float32 logits
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.inference_mode():
        for kernel in ("linear", "onednn"):
            m.lm_head.__class__, m.lm_head.kernels = ck.KernelLinear, {1: kernel, 2: kernel}
            got = head_logits(m, h)
            assert got.dtype == torch.float32
            # against the plain product: the head module itself now runs the measured kernel
            torch.testing.assert_close(got, torch.nn.functional.linear(h, m.lm_head.weight).float(),
                                       rtol=2 ** -7, atol=0.05)


@pytest.mark.skipif(not ck._ONEDNN_PACK, reason="oneDNN's packed layout is not in this PyTorch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_weights_for_a_model_loaded_to_infer(monkeypatch, tied, dtype):
    """inference_only models may keep their matrices in oneDNN's packed layout, q|k|v and gate|up fused
    first: the chain's tokens stay exact, the parameter count stays, the plain rows are gone (a part
    called alone fails), and saving refuses clearly instead of writing junk."""
    if dtype == torch.bfloat16 and not ck._ONEDNN_BF16:
        pytest.skip("oneDNN bfloat16 kernels need bfloat16 instructions")
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=128, max_seq_len=64, tie_embeddings=tied))
    m.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(V, generator=g)
    with torch.no_grad():
        m.embed_tokens.weight.copy_(torch.randn(V, 64, generator=g))
        if not tied:
            head = torch.empty_like(m.embed_tokens.weight)
            head[perm] = m.embed_tokens.weight
            m.lm_head.weight = torch.nn.Parameter(head)
    m.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        want = [o.tokens for o in Engine(copy.deepcopy(m), slots=4).generate(PROMPTS, SamplingParams(max_new_tokens=6))]
    n_params = m.num_params()
    m.inference_only = True
    monkeypatch.setattr(ck, "_MEASURED", {})
    real = ck._measure
    monkeypatch.setattr(ck, "_measure", lambda ws, batches, head, pack=False, compiled=False, bias=False:
                        ("packed", {b: "onednn" for b in batches}, False) if pack else real(ws, batches, head))
    tune_cpu_kernels(m, batches=(1, 4))
    assert all(p.is_mkldnn for n, p in m.layers.named_parameters() if n.endswith("proj.weight"))
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert attn.fused.weight.is_mkldnn and attn.q_proj.weight is attn.v_proj.weight  # one packed q|k|v matrix
    assert tuple(attn.fused.weight.shape) == (64 + 2 * 32, 64) and mlp.up_proj.weight is mlp.gate_proj.weight
    with pytest.raises(RuntimeError):  # no plain rows left to read alone
        attn.k_proj(torch.zeros(1, 64, dtype=dtype))
    assert (m.lm_head.packed.packed if tied else m.lm_head.weight).is_mkldnn
    assert m.embed_tokens.weight.is_mkldnn is False  # the lookup reads plain rows
    assert m.num_params() == n_params
    got = [o.tokens for o in Engine(m, slots=4).generate(PROMPTS, SamplingParams(max_new_tokens=6))]
    assert got == want
    if not tied:
        assert got == [row[:6] for row in expected(perm.tolist(), 6)]
    with pytest.raises(ValueError, match="packed for inference"):
        m.save_pretrained("/nonexistent")


@pytest.mark.skipif(not ck._ONEDNN_PACK, reason="oneDNN's packed layout is not in this PyTorch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_copies_of_frozen_bases_for_lora_rollouts(monkeypatch, tmp_path, dtype):
    """A model training LoRA (the PPO/GRPO policy) keeps its frozen matrices plain, which its training
    products read, and decodes through oneDNN's packed copies of them (with the adapters' terms
    added); a merge writes into the bases, the copies go stale and the plain matrices are read."""
    if dtype == torch.bfloat16 and not ck._ONEDNN_BF16:
        pytest.skip("oneDNN bfloat16 kernels need bfloat16 instructions")
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(ck, "_room_for_copies", lambda model: True)
    real = ck._measure
    monkeypatch.setattr(ck, "_measure", lambda ws, batches, head, pack=False, compiled=False, bias=False:
                        ("packed", {b: "onednn" for b in batches}, False) if pack else real(ws, batches, head))
    m, perm = chain_model(dtype, lora_r=4)
    assert set(m.cpu_kernels["layouts"].values()) == {"packed"}
    assert not any(p.is_mkldnn for p in m.parameters())
    attn, down, head = m.layers[0].self_attn, m.layers[0].mlp.down_proj, m.lm_head
    assert isinstance(attn.fused.packed, ck.PackedCopy) and isinstance(down.base.packed, ck.PackedCopy)
    assert isinstance(head.packed, ck.PackedCopy)
    assert greedy(m) == expected(perm)
    packed_reads, onednn = [], ck._onednn_linear
    monkeypatch.setattr(ck, "_onednn_linear", lambda x, w, b=None: packed_reads.append(w.is_mkldnn) or onednn(x, w, b))
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        plain = m(ids).float()
    assert packed_reads == []  # scoring reads the plain matrices
    with torch.inference_mode():
        torch.testing.assert_close(m(ids).float(), plain, rtol=0.02, atol=0.05)
    assert packed_reads.count(True) == 2 * 4 + 1  # per layer q|k|v, o, gate|up, down; then the head
    m.train()  # training reads the plain bases: gradients reach the adapters
    m(ids).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in lora_parameters(m))
    m.eval()
    merge_lora(m)  # the bases change in place: their packed copies must not be read any more
    assert attn.fused.packed.get([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) is None
    assert down.base.packed.get([down.base.weight]) is None
    assert head.packed.get([head.weight]) is not None  # the head took no adapter
    with torch.no_grad():
        merged = m(ids).float()
    packed_reads.clear()
    with torch.inference_mode():
        torch.testing.assert_close(m(ids).float(), merged, rtol=0.02, atol=0.05)
    assert packed_reads.count(True) == 1  # the head's copy only: the merged bases are read plain
    torch.testing.assert_close(merged, plain, rtol=0.02, atol=0.1)
    m.save_pretrained(tmp_path / "m")  # plain weights: saving works


@pytest.mark.skipif(not ck._ONEDNN_PACK, reason="oneDNN's packed layout is not in this PyTorch build")
def test_a_tied_head_gets_no_packed_copy_without_room(monkeypatch):
    """A head tied to the embedding can only be packed as a copy (the lookup reads plain rows): in a
    model loaded to infer that copy is made only where it fits (`room_for`); the blocks, packed in
    place, take no extra memory and are packed either way."""
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(ck, "room_for", lambda nbytes: False)
    real = ck._measure
    monkeypatch.setattr(ck, "_measure", lambda ws, batches, head, pack=False, compiled=False, bias=False:
                        ("packed", {b: "onednn" for b in batches}, False) if pack else real(ws, batches, head))
    m = Transformer(ModelConfig(arch="llama", vocab_size=V, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                ffn_dim=128, max_seq_len=64, tie_embeddings=True))
    m.init_weights(seed=0)
    m.eval().requires_grad_(False).inference_only = True
    tune_cpu_kernels(m, batches=(1, 4))
    assert m.cpu_kernels["layouts"]["head"] != "packed" and getattr(m.lm_head, "packed", None) is None
    assert m.lm_head.weight is m.embed_tokens.weight and not m.embed_tokens.weight.is_mkldnn
    assert m.layers[0].mlp.down_proj.weight.is_mkldnn and m.layers[0].self_attn.fused.weight.is_mkldnn


def test_layouts_and_cache_dtypes_are_chosen_with_each_batch_size_weighing_alike():
    """Summed seconds would pick "col" (10.5 s against 11 s, decided by batch 8's slow product); over
    the best time at each batch size "row" costs 1 + 1.11 and "col" 1.5 + 1."""
    seconds = {("row", 1): 1.0, ("row", 8): 10.0, ("col", 1): 1.5, ("col", 8): 9.0}
    assert ck._weighing_batches_alike(seconds, ("row", "col"), (1, 8)) == "row"
    assert ck._weighing_batches_alike(seconds, ("row", "col"), (8,)) == "col"


def test_room_for_packed_copies():
    m = Transformer(ModelConfig(arch="llama", vocab_size=V, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                ffn_dim=128, max_seq_len=64))
    assert not ck._room_for_copies(m)  # nothing frozen: nothing to copy
    m.requires_grad_(False)
    assert ck._room_for_copies(m)  # a few hundred kB fit anywhere this runs


def test_load_for_inference_marks_the_model(tiny_dir):
    from nanohuatuo.generate import load_for_inference
    m, _, _ = load_for_inference(tiny_dir)
    assert m.inference_only and not any(p.requires_grad for p in m.parameters())


# ----------------------------------------------------------------------------- loading with --dtype bfloat16

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    lines = ["头痛怎么办？多休息，多喝水。", "咳嗽怎么办？请去医院检查。"] * 20
    return tiny_base(tmp_path_factory.mktemp("bf16"), lines, dim=64, ffn_dim=128, max_seq_len=512).dir


def test_chat_and_serve_load_bfloat16_on_cpu(tiny_dir, capsys):
    from nanohuatuo.chat import main as chat_main
    from nanohuatuo.serve import ServeConfig, load_model
    for quant in ("none", "int8"):
        model, _, _ = load_model(ServeConfig(model=tiny_dir, device="cpu", dtype="bfloat16", quant=quant))
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        q = model.layers[0].self_attn.q_proj
        assert q.weight.dtype == (torch.int8 if quant == "int8" else torch.bfloat16)
    capsys.readouterr()
    assert chat_main(["--model", tiny_dir, "--device", "cpu", "--dtype", "bfloat16", "--quant", "int8",
                      "--template", "huatuo", "--prompt", "头痛怎么办？", "--max-new-tokens", "4",
                      "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


# ----------------------------------------------------------------------------- the benchmark's measures

def bench_generate():
    """bench/generate.py as a module."""
    return bench_module("generate")


def test_benchmark_counts_bytes_read_and_tokens_matched(tiny_dir):
    bench = bench_generate()
    # rows counted up to their first difference: a flipped near-tie costs the rest of its row
    assert bench.same_prefix([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]]) == 6 / 8
    m, _ = chain_model()
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    embed = m.embed_tokens.weight.numel() * 4
    assert bench.read_bytes(m) == m.num_params() * 4 - embed + buffers  # untied: the embedding is not read whole
    m.lm_head.weight = m.embed_tokens.weight
    assert bench.read_bytes(m) == m.num_params() * 4 + buffers  # tied: it is the head
    q, _ = chain_model(int8=True)
    linears = [x for x in q.modules() if isinstance(x, Int8Linear)]
    int8_bytes = sum(x.weight.numel() + x.scales.numel() * 4 for x in linears)
    norms = sum(p.numel() * 4 for n, p in q.named_parameters() if "norm" in n)
    rope = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if not n.endswith((".weight", ".scales")))
    assert bench.read_bytes(q) == int8_bytes + norms + rope  # int8 weights, float32 scales; not the embedding
    # --model DIR: the bundled evaluation questions in the checkpoint's own chat template
    prompts = bench.eval_prompts(tiny_dir)(3, V)
    assert len(prompts) == 3 and all(isinstance(i, int) for p in prompts for i in p) and prompts[0] != prompts[1]


def test_benchmark_keeps_rows_as_they_come_and_reports_without_the_static_path(tmp_path, capsys):
    """bench/generate.py --out: the JSON file holds every row measured so far (a run stopped by a time
    limit keeps them); rows without the static path (--no-static) print '-' in its columns."""
    import json
    import os
    bench = bench_generate()
    out = str(tmp_path / "rows.json")
    rows = bench.Rows(out, 1e9)
    fixed = dict(table="fixed", size="tiny", params=1e6, compile=True, batch=1, hf_tok_s=10.0, engine_tok_s=50.0,
                 hf_bw_share=0.1, engine_bw_share=0.5, same_tokens={"engine": True})
    rows.add(fixed)
    assert json.load(open(out)) == dict(bandwidth=1e9, rows=[fixed])
    mixed = dict(table="mixed", size="tiny", compile=False, requests=8, slots=4, tokens=80, hf_tok_s=20.0,
                 engine_tok_s=60.0, same_tokens={"engine": False})
    rows.add(mixed)
    assert json.load(open(out))["rows"] == [fixed, mixed] and not os.path.exists(out + ".tmp")
    capsys.readouterr()
    bench.report(rows)
    text = capsys.readouterr().out
    assert "| tiny compiled (1M) | 1 | 10.0 | - | 50.0 | 5.00x | -, yes | 10% / - / 50% |" in text
    assert "| tiny | 8 / 4 | 80 | 20.0 | - | 60.0 | - | 3.00x | -, no |" in text
    # with the share of transformers' tokens matched (rows up to their first difference), a "no" says how far
    rows.add(dict(mixed, size="small", same_share={"engine": bench.same_prefix([[1, 2, 9], [4, 5]], [[1, 2, 3], [4, 6]])}))
    bench.report(rows)
    assert "| small | 8 / 4 | 80 | 20.0 | - | 60.0 | - | 3.00x | -, no (60%) |" in capsys.readouterr().out


def test_benchmark_weight_formats_run_eagerly_then_compiled(tiny_dir, monkeypatch, capsys):
    """Table (e) with --compile: every format of --weights eagerly, then again tuned and decoded
    compiled, as chat and serve run with --compile; float32's eager tokens are the reference of all
    (float32 itself compiled only when asked for), and the report labels the compiled rows."""
    import argparse
    bench = bench_generate()
    calls = []
    monkeypatch.setattr(bench, "tune_cpu_kernels", lambda m, batches, compiled=False: calls.append(
        ("tune", m.fmt, batches, compiled)))

    class Loaded:  # what load_format returns, as far as the table reads it
        config, cpu_kernels, embed_tokens = ModelConfig(vocab_size=V), {}, torch.nn.Embedding(2, 2)

        def __init__(self, fmt):
            self.fmt = fmt

        def num_params(self):
            return 10
    monkeypatch.setattr(bench, "load_format", lambda path, fmt, args: Loaded(fmt))
    monkeypatch.setattr(bench, "read_bytes", lambda m: 100)
    monkeypatch.setattr(bench, "time_it", lambda fn, device, repeats: fn() and 0.5)

    def generate(model, prompts, max_new_tokens, compile=False):  # int8 compiled parts from float32's 2nd token
        calls.append(("generate", model.fmt, compile))
        return [[1, 2, 3, 4] if model.fmt == "float32" or not compile else [1, 9, 3, 4] for _ in prompts]
    monkeypatch.setattr(bench, "generate", generate)
    args = argparse.Namespace(device="cpu", dtype="float32", weights=["int8"], batch_sizes=[1], new_tokens=4,
                              prompt_len=8, repeats=1, compile=True)
    rows = bench.Rows(None, 1e9)
    bench.weight_formats("tiny", tiny_dir, args, lambda: 1e9, rows)
    assert [c for c in calls if c[0] == "tune"] == [("tune", "float32", (1, 1), False), ("tune", "int8", (1, 1), False),
                                                    ("tune", "int8", (1, 1), True)]
    assert [(r["weights"], r["compile"], r["same_as_float32"]) for r in rows] == [("int8", False, 1.0), ("int8", True, 0.25)]
    capsys.readouterr()
    bench.report(rows)
    text = capsys.readouterr().out
    assert "| tiny (0M) | int8 |" in text and "| tiny compiled (0M) | int8 |" in text


def test_benchmark_tables_as_the_gpu_script_runs_them(tmp_path):
    """Tables (a) and (b) with bench/gpu.sh's choices on a tiny model: the static path left out,
    transformers timed in the first round and its tokens and figure reused in the next (the compiled
    one, there), the engine's tokens checked against them, a batch-1 share against the bar."""
    import argparse
    import transformers
    from nanohuatuo.generate import for_inference
    bench = bench_generate()
    path = bench.build("tiny", str(tmp_path), torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = for_inference(Transformer.from_pretrained(path))
    args = argparse.Namespace(device="cpu", dtype="float32", batch_sizes=[1, 3], new_tokens=4, prompt_len=8,
                              repeats=1, no_static=True, mixed_requests=5, mixed_prompt=[8, 16], mixed_new=[2, 6],
                              slots=2)
    rows, calls, real, counts = bench.Rows(None, 1e9), [], bench.hf_generate, []
    bench.hf_generate = lambda *a: calls.append(1) or real(*a)
    engines, engine = [], bench.Engine
    bench.Engine = lambda *a, **kw: engines.append(kw["max_len"]) or engine(*a, **kw)
    for _ in range(2):
        bench.fixed_length("tiny", args, hf, ours, lambda: 1e9, False, rows)
        bench.mixed("tiny", args, hf, ours, False, rows)
        counts.append(len(calls))
    assert [r["table"] for r in rows] == ["fixed", "fixed", "mixed"] * 2
    first, second = rows[:3], rows[3:]
    assert all(r["same_tokens"] == {"engine": True} and "static_tok_s" not in r for r in rows)
    assert [r["hf_tok_s"] for r in first] == [r["hf_tok_s"] for r in second]
    assert first[0]["engine_bw_share"] == ours.num_params() * 4 * first[0]["engine_tok_s"] / 1e9
    # (a): tokens, a warm-up and a timed run per batch size; (b): a warm-up and 3 batches of 2 slots; then none
    assert counts == [2 * 3 + 1 + 3] * 2
    # (b)'s warm-up engine has the timed one's cache shape (a compiled step's CUDA graphs are per shape)
    assert len(engines) == 4 and len(set(engines)) == 1


def test_benchmark_goes_on_past_a_failing_table(capsys):
    """A table that fails prints its traceback and is listed; the next one still runs (main exits 1
    after the report when the list is not empty)."""
    bench = bench_generate()
    failed, ran = [], []
    bench.run_table(failed, "(e) missing", lambda path: open(path), "/nonexistent/config.json")
    bench.run_table(failed, "(a) tiny", ran.append, 1)
    assert ran == [1] and failed == ["(e) missing: FileNotFoundError: [Errno 2] No such file or directory: "
                                     "'/nonexistent/config.json'"]
    out = capsys.readouterr()
    assert "Traceback" in out.err and "[(e) missing: 0 s]" in out.out and "[(a) tiny: 0 s]" in out.out


def test_decode_profile_times_the_compiled_call_and_puts_it_back(monkeypatch):
    """bench/decode_profile.py --compile: the engine's compiled step is wrapped so that its wall time
    is added to the timers (it can't be split by block), and the engine's own is restored after."""
    import os
    import nanohuatuo.engine as engine_mod
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    profile = bench_module("decode_profile")  # which imports bench/generate.py as a script does
    real = lambda device_type="cuda": (lambda *a: sum(a))  # noqa: E731
    monkeypatch.setattr(engine_mod, "compiled_decode", real)
    timers = profile.Timers()
    undo = profile.compiled_call_timed(timers, "cpu")
    assert engine_mod.compiled_decode("cpu")(1, 2) == 3 and engine_mod.compiled_decode("cpu")(3) == 3
    assert list(timers.t) == ["compiled call (synchronised)"] and timers.t["compiled call (synchronised)"] > 0
    undo()
    assert engine_mod.compiled_decode is real


def test_decode_profile_times_the_guard_check_of_a_compiled_step(monkeypatch):
    """bench/decode_profile.py --compile: the guard check Dynamo makes before a compiled step's call,
    timed on that step's own arguments during the step; the step still decodes its token and the
    engine's compiled_decode is its own again after."""
    import os
    import nanohuatuo.engine as engine_mod
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    profile = bench_module("decode_profile")
    m = Transformer(ModelConfig(arch="llama", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=48, max_seq_len=64))
    m.init_weights(seed=0)
    eng = Engine(m.eval(), slots=1, max_len=32, compile=True)
    eng.add([1, 2, 3], SamplingParams(max_new_tokens=8))
    for _ in range(3):  # the prefill, then the batch-1 graph compiled
        eng.step()
    if not eng.compile:
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler)")
    real, before = engine_mod.compiled_decode, len(eng.running[0].tokens)
    seconds = profile.guard_check_seconds(eng, n=10)
    assert seconds is not None and seconds > 0 and len(eng.running[0].tokens) == before + 1
    assert engine_mod.compiled_decode is real


def test_decode_profile_takes_the_weight_reads_out_of_the_products_and_puts_them_back(monkeypatch):
    """bench/decode_profile.py's split: with `without_weight_reads` every measured product (KernelLinear,
    a fused matrix) returns zeros of its output's shape, unread; undone, it is the product again, and
    `measured_bytes` counts the weights it took out (each once)."""
    import os
    from nanohuatuo.cpu_kernels import FusedLinear, KernelLinear
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    profile = bench_module("decode_profile")
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    lin.__class__, lin.kernels = KernelLinear, {1: "linear"}
    parts = [torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(4, 5, bias=False)]
    fused = FusedLinear(parts, torch.randn(7, 4), None, {1: "linear"})
    x = torch.randn(2, 4)
    with torch.inference_mode():
        expected = lin(x), fused.product(x, parts)
        undo = profile.without_weight_reads()
        try:
            zeros = lin(x), fused.product(x, parts)
        finally:
            undo()
        again = lin(x), fused.product(x, parts)
    assert [tuple(z.shape) for z in zeros] == [(2, 3), (2, 7)] and all(not z.any() for z in zeros)
    assert all(torch.equal(a, e) for a, e in zip(again, expected)) and expected[0].abs().sum() > 0
    holder = torch.nn.Module()
    holder.lin, holder.same = lin, lin
    assert profile.measured_bytes(holder) == 3 * 4 * 4
    # each round: 10 steps as they are, 10 without the weight reads (split), one bandwidth read; undone after
    plain, reads = KernelLinear.forward, []

    class Steps:
        kinds = []

        def step(self):
            self.kinds.append(KernelLinear.forward is plain)
    eng = Steps()
    rounds = profile.paired_rounds(eng, lambda n: reads.append(n) or 5e10, 2, split=True)
    assert eng.kinds == ([True] * 10 + [False] * 10) * 2 and reads == [10, 10] and KernelLinear.forward is plain
    assert [(free is not None, bw, alone) for _, free, bw, alone in rounds] == [(True, 5e10, None)] * 2
    eng.kinds.clear()
    assert [free for _, free, _, _ in profile.paired_rounds(eng, lambda n: 5e10, 1)] == [None] and eng.kinds == [True] * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_reduction_in_row_blocks_sums_each_row_as_one_block_does(monkeypatch, dtype):
    """`reduction` splits the rows into `ROW_BLOCKS` blocks (the last shorter where they do not divide
    the rows) summed side by side in one compiled loop: each row's sum is bit for bit the one a single
    block gives, for float32, bfloat16 and int8 (with scales) weights, with a bias, and a tail of the
    input shorter than a vector; and it is the product F.linear computes, also where rows longer than
    `CHUNK` are summed in chunks. The reductions it writes are counted in its traced graph, so a
    `reduction` that ignored the blocks or the chunks would fail here."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def sums(rows, k, **settings):  # the reductions `reduction` writes for a (rows, k) matrix
        for name, value in settings.items():
            monkeypatch.setattr(cpu_reduction, name, value)
        graph = make_fx(lambda x, w: cpu_reduction.reduction(x, w))(torch.randn(1, 1, k), torch.randn(rows, k)).graph
        return sum(n.op == "call_function" and "sum" in str(n.target) for n in graph.nodes)
    # four blocks (46 rows: 12, 12, 12, 10; 3 rows: three of one), or one; chunks: two sums a block, none for 37
    assert [sums(48, 40, ROW_BLOCKS=1), sums(48, 40, ROW_BLOCKS=4), sums(46, 40), sums(3, 40)] == [1, 4, 4, 3]
    assert [sums(48, 40, CHUNK=16), sums(48, 37), sums(48, 40, CHUNK=4096)] == [8, 4, 4]
    if cpu_reduction.chain_kernel() is None:
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler)")
    torch.manual_seed(0)
    fn = torch.compile(cpu_reduction.reduction, dynamic=False, fullgraph=True)  # guards on ROW_BLOCKS
    for rows in (48, 46, 3):
        x, bias = torch.randn(1, 1, 40), torch.randn(rows)
        if dtype is torch.int8:
            w, scales = torch.randint(-127, 128, (rows, 40), dtype=torch.int8), torch.rand(rows) / 100
            dense = w.float() * scales[:, None]
        else:
            w, scales = torch.randn(rows, 40).to(dtype), None
            x, bias, dense = x.to(dtype), bias.to(dtype), w.float()
        with torch.inference_mode():
            monkeypatch.setattr(cpu_reduction, "ROW_BLOCKS", 1)
            one = fn(x, w, bias, scales)
            monkeypatch.setattr(cpu_reduction, "ROW_BLOCKS", 4)
            blocks = fn(x, w, bias, scales)
        assert blocks.shape == (1, 1, rows) and blocks.dtype == x.dtype and torch.equal(blocks, one), rows
        want = torch.nn.functional.linear(x.float(), dense) + bias.float()
        tol = dict(atol=1e-4 if dtype is not torch.bfloat16 else 0.1, rtol=1e-2)
        torch.testing.assert_close(blocks.float(), want, **tol)
        # rows longer than CHUNK: in equal chunks (40 = 4 x 10 under 16), each summed apart; a length with no
        # divisor up to 16 (37) stays whole
        monkeypatch.setattr(cpu_reduction, "CHUNK", 16)
        with torch.inference_mode():
            chunked = fn(x, w, bias, scales)
            odd = fn(x[..., :37], w[:, :37].contiguous(), bias, scales)
            monkeypatch.setattr(cpu_reduction, "CHUNK", 4096)
            whole = fn(x[..., :37], w[:, :37].contiguous(), bias, scales)
        torch.testing.assert_close(chunked.float(), want, **tol)
        assert torch.equal(odd, whole)


def test_compiled_reduction_is_timed_as_a_batch_1_kernel_of_the_row_layout(monkeypatch):
    """`_measure(..., compiled=True)`: the compiler's reduction is timed at batch 1 in the row layout
    only, its answer the third value (never among the eager kernels, which still cover every batch);
    the reduction and the chain that times it compute the product; without `compiled` it is never
    timed, and the decisions are cached apart."""
    monkeypatch.setattr(ck, "_MEASURED", {})
    if ck.chain_kernel() is None:
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler)")
    torch.manual_seed(0)
    ws = [torch.randn(48, 32) for _ in range(3)]
    x, b = torch.randn(1, 1, 32), torch.randn(48)
    torch.testing.assert_close(ck.reduction(x, ws[0], b), torch.nn.functional.linear(x, ws[0], b), atol=1e-5, rtol=0)
    with torch.no_grad():
        chained = ck.chain_kernel()(x[0], *ws)
    want = x[0]
    for w in ws:
        want = want + torch.nn.functional.linear(want, w).sum(-1, keepdim=True) * 1e-30
    torch.testing.assert_close(chained, want)
    timed = []
    reduce_all = ck.reduce_all
    monkeypatch.setattr(ck, "reduce_all", lambda x, wl: timed.append((tuple(x.shape), len(wl))) or reduce_all(x, wl))
    layout, kernels, reduce = ck._measure(ws, (1, 4), head=False, compiled=True)
    assert timed and set(timed) == {((1, 32), 64)}  # batch 1 only, over whole chains of the streamed copies
    assert set(kernels) == {1, 4} and set(kernels.values()) <= {"linear", "onednn"}
    assert reduce in (True, False) and (not reduce or layout == "row")
    timed.clear()
    assert ck._measure(ws, (1, 4), head=False)[2] is False and not timed
    assert len(ck._MEASURED) == 2
    # a reduction that costs nothing wins batch 1, so the row layout, whose eager kernels still cover batch 1
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(ck, "reduce_all", lambda x, wl: timed.append((tuple(x.shape), len(wl))))
    layout, kernels, reduce = ck._measure(ws, (1, 4), head=False, compiled=True)
    assert (layout, reduce) == ("row", True) and set(kernels) == {1, 4} and set(kernels.values()) <= {"linear", "onednn"}


def test_decode_profile_replays_a_steps_products_in_its_order(monkeypatch):
    """bench/decode_profile.py's products alone: one decode step's measured products recorded in the
    step's order (q|k|v, o, gate|up, down in each block, then the head), with their weight bytes,
    each replayed on a copy of its input; the model's own methods are back after the recording."""
    import os
    from nanohuatuo.cpu_kernels import FusedLinear, KernelLinear
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    profile = bench_module("decode_profile")
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(ck, "_measure", lambda ws, batches, head, pack=False, compiled=False, bias=False:
                        ("row", {b: "onednn" for b in batches}, False))
    m = Transformer(ModelConfig(arch="llama", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=48, max_seq_len=64)).eval()
    eng = Engine(m, slots=1, max_len=32)
    eng.add([1, 2, 3], SamplingParams(max_new_tokens=8))
    with torch.inference_mode():
        eng.step()  # the prefill
        forward, product = KernelLinear.forward, FusedLinear.product
        calls = profile.recorded_products(m, eng)
        assert (KernelLinear.forward, FusedLinear.product) == (forward, product)
        assert [(label, size) for label, size, _ in calls] == \
            [("q|k|v", 64 * 32 * 4), ("o", 32 * 32 * 4), ("gate|up", 96 * 32 * 4), ("down", 32 * 48 * 4)] * 2 \
            + [("lm_head", 50 * 32 * 4)]
        outs = [call() for _, _, call in calls]
        assert [tuple(o.shape) for o in outs[:4]] == [(1, 1, 64), (1, 1, 32), (1, 1, 96), (1, 1, 32)]
        times = profile.replay(calls, n=2)
        assert set(times) == {"q|k|v", "o", "gate|up", "down", "lm_head"} and all(t > 0 for t in times.values())


def test_prefill_benchmark_times_each_format_and_int8_with_and_without_its_rows_kernel(tmp_path, monkeypatch):
    """bench/prefill.py on the tiny shape: a row per format and prompt length beside transformers, and
    for int8 a second row with every layer's rows kernel off, alternated in the same process; the
    layers get their measured rows kernels back afterwards."""
    import json
    import sys
    prefill = bench_module("prefill")
    out = tmp_path / "prefill.json"
    monkeypatch.setattr(sys, "argv", ["prefill.py", "--size", "tiny", "--lengths", "8", "40", "--repeats", "1",
                                      "--workdir", str(tmp_path), "--out", str(out)])
    switched = []
    real = prefill.first_token
    monkeypatch.setattr(prefill, "first_token", lambda engine, p: switched.append(
        {m.rows_kernel for m in ck.int8_layers(engine.model)}) or real(engine, p))
    prefill.main()
    rows = json.load(open(out))["rows"]
    assert [(r["weights"], r["prompt"]) for r in rows] == [
        ("float32", 8), ("float32", 40), ("bfloat16", 8), ("bfloat16", 40),
        ("int8", 8), ("int8, decode kernels", 8), ("int8", 40), ("int8, decode kernels", 40)]
    assert all(r["engine_ms"] > 0 and r["transformers_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert all(r["same_token"] for r in rows if r["weights"] == "float32")
    int8_runs = switched[-8:]  # 2 lengths x (a warm-up and a timed round) x the two variants, alternated
    assert all(None not in s for s in int8_runs[0::2]) and all(s == {None} for s in int8_runs[1::2])


def test_prefill_benchmark_times_a_conversation_in_the_session_engine_and_in_new_ones(tmp_path, monkeypatch):
    """bench/prefill.py --model DIR --turns N: a row per turn, the wait for its first token in chat's
    session engine (keep_prefixes) and in a new engine per turn, with the prompt growing turn by turn."""
    import json
    import sys
    prefill = bench_module("prefill")
    texts = ["头痛三天了，伴有低烧，需要吃什么药？", "建议多休息，多喝水，体温超过38.5度可以服用退烧药。",
             "孩子咳嗽有痰怎么办？", "可以先观察，注意保暖，如果持续加重请及时就医。"] * 4
    base = tiny_base(tmp_path / "base", texts, max_seq_len=1024)
    out = tmp_path / "turns.json"
    engines = []
    real = prefill.conversation
    monkeypatch.setattr(prefill, "conversation", lambda *a, **kw: engines.append(
        a[5] if len(a) > 5 else kw.get("engine")) or real(*a, **kw))
    monkeypatch.setattr(sys, "argv", ["prefill.py", "--model", base.dir, "--lengths", "--weights", "float32", "--turns",
                                      "3", "--answer-tokens", "4", "--no-hf", "--out", str(out)])
    prefill.main()
    turns = json.load(open(out))["turns"]
    assert [r["turn"] for r in turns] == [1, 2, 3]
    assert turns[0]["prompt"] < turns[1]["prompt"] < turns[2]["prompt"]
    assert all(r["session_ms"] > 0 and r["new_engine_ms"] > 0 for r in turns)
    # the warm-up and the new-engine conversation make their own engines; the session's keeps prefixes
    assert engines[0] is None and engines[1].keep_prefixes and engines[2] is None


def test_decode_ab_refuses_comparisons_its_device_cannot_make(monkeypatch, capsys):
    """bench/decode_ab.py checks its arguments before building anything: --compare graphs needs
    --device cuda, CUDA takes only the comparisons that run there, --compile only rows or chunks, and
    --device cuda needs a CUDA device; each is one line on stderr and exit code 2."""
    import sys
    ab = bench_module("decode_ab")
    cases = [(["--compare", "graphs"], "--compare graphs compares CUDA graphs: add --device cuda"),
             (["--device", "cuda", "--compare", "layout"], "--compare layout times CPU kernels"),
             (["--compare", "layout", "--compile"], "--compile is for --compare rows or chunks")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--compare", "compile"], "PyTorch sees no CUDA device here"))
    for argv, says in cases:
        monkeypatch.setattr(sys, "argv", ["decode_ab.py", *argv])
        with pytest.raises(SystemExit) as e:
            ab.main()
        assert e.value.code == 2, argv
        assert says in capsys.readouterr().err, argv


def test_gguf_tool_names_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("junk")
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gguf_to_hf.py")
    r = subprocess.run([sys.executable, tool, "--gguf", str(bad), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: {bad}: not a GGUF file (it does not start with the bytes GGUF)\n"
