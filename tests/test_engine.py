"""The continuous-batching engine: every request gets exactly what it gets alone, whatever joins,
leaves, stops or is cancelled around it; prefix reuse; log-probs against a plain forward pass."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from nanohuatuo.cpu_kernels import tune_cpu_kernels
from nanohuatuo.engine import Engine, SamplingParams, sample_seed
from nanohuatuo.model import ModelConfig, Transformer

PROMPTS = [[5, 17, 3, 88, 42, 9, 1], [7, 7, 60], [99, 12, 31, 4, 4, 70, 2, 8, 15, 23], [1], [64, 2, 33, 33],
           [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [3, 1, 4, 1, 5, 9, 2, 6]]
CONFIGS = {
    "llama": dict(),  # RoPE, grouped-query attention
    "alibi": dict(pos="alibi", norm="layer", mlp="gelu", qkv="bloom", n_kv_heads=None, qkv_bias=True),
    "window": dict(sliding_window=4),
}


def tiny(kind="llama", seed=0):
    kw = dict(arch="llama", vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
              max_seq_len=128)
    kw.update(CONFIGS[kind])
    m = Transformer(ModelConfig(**kw))
    m.init_weights(std=0.3, seed=seed)  # wide enough that greedy choices are not near-ties
    return m.eval()


def solo(model, prompt, params, **kw):
    return Engine(model, slots=1, max_len=64, **kw).generate([prompt], params)[0]


def drain(eng, outs=None):
    outs = {} if outs is None else outs
    while eng.has_work():
        for ev in eng.step():
            o = outs.setdefault(ev.rid, {"tokens": [], "logprobs": [], "reason": None})
            if ev.token is not None:
                o["tokens"].append(ev.token)
                o["logprobs"].append(ev.logprob)
            o["reason"] = ev.finish_reason
    return outs


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_requests_joining_and_leaving_get_their_solo_greedy_output(kind):
    m = tiny(kind)
    lengths = [9, 3, 14, 6, 11, 5, 8]
    want = [solo(m, p, SamplingParams(max_new_tokens=n)).tokens for p, n in zip(PROMPTS, lengths)]
    assert all(len(w) == n for w, n in zip(want, lengths))
    eng = Engine(m, slots=3, max_len=64)
    rid_of, outs, pending, step = {}, {}, list(range(len(PROMPTS))), 0
    while pending or eng.has_work():
        if pending and (step % 2 == 0 or len(rid_of) < 3):  # three at once, then one every other step
            i = pending.pop(0)
            rid_of[eng.add(PROMPTS[i], SamplingParams(max_new_tokens=lengths[i]))] = i
        for ev in eng.step():
            outs.setdefault(ev.rid, []).append(ev.token)
        assert len(eng.running) <= 3
        step += 1
    assert {i: outs[rid] for rid, i in rid_of.items()} == dict(enumerate(want))


def test_more_requests_than_slots_reuse_the_slots():
    m = tiny()
    params = [SamplingParams(max_new_tokens=n) for n in (7, 12, 4, 9, 10, 3, 6)]
    want = [solo(m, p, sp).tokens for p, sp in zip(PROMPTS, params)]
    eng = Engine(m, slots=2, max_len=64)
    outs = eng.generate(PROMPTS, params)
    assert [o.tokens for o in outs] == want
    assert [o.finish_reason for o in outs] == ["length"] * len(PROMPTS)
    assert not eng.running and not eng.requests and not eng.has_work()


def test_seeded_sampling_does_not_depend_on_the_batch():
    m = tiny()
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=123)
    alone = solo(m, PROMPTS[0], sp).tokens
    others = [SamplingParams(max_new_tokens=n, temperature=t, top_p=p, top_k=k, repetition_penalty=r, seed=s)
              for n, t, p, k, r, s in [(5, 1.2, 1.0, 0, 1.3, None), (15, 0.0, 1.0, 0, 1.0, None),
                                       (8, 0.7, 0.5, 5, 1.0, 7), (12, 1.0, 1.0, 0, 1.0, 123)]]
    eng = Engine(m, slots=3, max_len=64)
    outs = eng.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0], PROMPTS[4], PROMPTS[5]],
                        [others[0], others[1], sp, others[2], others[3]])
    assert outs[2].tokens == alone
    assert solo(m, PROMPTS[0], SamplingParams(**dict(vars(sp), seed=124))).tokens != alone


def test_stop_ids_and_stop_strings_end_only_their_own_row():
    class CharTok:
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    m = tiny()
    free = [solo(m, p, SamplingParams(max_new_tokens=12)).tokens for p in PROMPTS[:3]]
    stop_id = free[0][4]
    text = CharTok().decode(free[2])
    stop = text[5:7]
    end = text.find(stop) + len(stop)
    eng = Engine(m, tokenizer=CharTok(), slots=3, max_len=64)
    outs = eng.generate(PROMPTS[:3], [SamplingParams(max_new_tokens=12, stop_ids=(stop_id,)),
                                      SamplingParams(max_new_tokens=12),
                                      SamplingParams(max_new_tokens=12, stop_strings=(stop,))])
    assert outs[0].tokens == free[0][:free[0].index(stop_id) + 1] and outs[0].finish_reason == "stop"
    assert outs[1].tokens == free[1] and outs[1].finish_reason == "length"
    assert outs[2].tokens == free[2][:end] and outs[2].finish_reason == "stop"
    assert outs[2].text == text[:end]
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(m).add([1, 2], SamplingParams(stop_strings=("x",)))


def test_prefix_reuse_equals_prefilling_each_copy(monkeypatch):
    import nanohuatuo.engine as engine
    m = tiny()
    prefills = []
    real = engine.forward

    def counting(model, ids, *a):
        if ids.shape[1] > 1:
            prefills.append(ids.shape[1])
        return real(model, ids, *a)

    monkeypatch.setattr(engine, "forward", counting)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, logprobs=True)
    eng = Engine(m, slots=5, max_len=64)
    other = eng.add(PROMPTS[2], SamplingParams(max_new_tokens=4))  # runs beside the samples
    reqs = [eng.requests[r] for r in eng.add(PROMPTS[5], sp, n=4)]
    outs = drain(eng)
    assert prefills == [len(PROMPTS[2]) - 1, len(PROMPTS[5]) - 1]
    assert outs[other]["tokens"] == solo(m, PROMPTS[2], SamplingParams(max_new_tokens=4)).tokens
    seeds = [SamplingParams(**dict(vars(sp), seed=sample_seed(5, j))) for j in range(4)]
    # the same batch with each copy added on its own (five single requests: one padded prefill of
    # their 9 and 11 tokens): bit-identical
    prefills.clear()
    eng = Engine(m, slots=5, max_len=64)
    eng.add(PROMPTS[2], SamplingParams(max_new_tokens=4))
    copies = [eng.requests[eng.add(PROMPTS[5], s)] for s in seeds]
    drain(eng)
    assert prefills == [len(PROMPTS[5]) - 1]
    assert [r.tokens for r in reqs] == [r.tokens for r in copies]
    assert [r.logprobs for r in reqs] == [r.logprobs for r in copies]
    assert len({tuple(r.tokens) for r in reqs}) > 1  # the samples differ
    # generate() groups identical prompts itself; alone, each copy gets the same tokens
    prefills.clear()
    grouped = Engine(m, slots=4, max_len=64).generate([PROMPTS[5]] * 4, seeds)
    assert len(prefills) == 1
    assert [o.tokens for o in grouped] == [r.tokens for r in reqs] == [solo(m, PROMPTS[5], s).tokens for s in seeds]


def test_requests_admitted_together_share_one_prefill(monkeypatch):
    """Single requests admitted in one step are prefilled in one right-padded forward while the padding
    stays small (sorted by length, cut past a quarter of padding), and each gets what it gets alone:
    its greedy tokens and its prompt log-probs."""
    import nanohuatuo.engine as engine
    m = tiny()
    shapes = []
    real = engine.forward

    def counting(model, ids, *a):
        if ids.shape[1] > 1:
            shapes.append(tuple(ids.shape))
        return real(model, ids, *a)

    def run(eng, prompts, sp):
        rids = [eng.add(p, sp) for p in prompts]
        got = {}
        while eng.has_work():
            for ev in eng.step():
                o = got.setdefault(ev.rid, {"tokens": [], "prompt": None})
                o["tokens"].append(ev.token)
                o["prompt"] = o["prompt"] or ev.prompt_logprobs
        return [got[r] for r in rids]

    monkeypatch.setattr(engine, "forward", counting)
    prompts = [PROMPTS[0], PROMPTS[6], PROMPTS[2], [1], PROMPTS[5]]  # 7, 8, 10, 1 and 12 tokens
    sp = SamplingParams(max_new_tokens=6, prompt_logprobs=True, top_logprobs=2)
    together = run(Engine(m, slots=5, max_len=64), prompts, sp)
    # all but the last token prefilled: 6, 7 and 9 in one forward padded to 9 (27 slots for 22 tokens);
    # 11 would pad 4 rows to 44 slots for 33 tokens, so it goes alone; the 1-token prompt needs none
    assert shapes == [(3, 9), (1, 11)]
    for p, o in zip(prompts, together):
        alone = run(Engine(m, slots=1, max_len=64), [p], sp)[0]
        assert o["tokens"] == alone["tokens"]
        if len(p) == 1:
            assert not o["prompt"]
            continue
        assert [t for t, _, _ in o["prompt"]] == p[1:] == [t for t, _, _ in alone["prompt"]]
        torch.testing.assert_close(torch.tensor([lp for _, lp, _ in o["prompt"]]),
                                   torch.tensor([lp for _, lp, _ in alone["prompt"]]), atol=1e-5, rtol=0)


def test_logprobs_match_a_plain_forward_pass():
    m = tiny()
    params = [SamplingParams(max_new_tokens=10, temperature=t, top_k=k, top_p=p, seed=3, logprobs=True,
                             top_logprobs=3) for t, k, p in [(0.0, 0, 1.0), (0.7, 10, 0.9), (1.3, 0, 1.0)]]
    outs = Engine(m, slots=3, max_len=64).generate(PROMPTS[:3], params)
    for p, sp, o in zip(PROMPTS, params, outs):
        seq = torch.tensor([p + o.tokens])
        with torch.no_grad():
            lp = torch.log_softmax(m(seq)[0, len(p) - 1:-1] / (sp.temperature or 1.0), -1)
        want = lp.gather(-1, torch.tensor(o.tokens)[:, None]).squeeze(-1)
        # the engine decodes through the kernels timed at load (oneDNN or F.linear, row or column
        # layout, fused q|k|v): their float32 rounding differs from the plain forward's by ~1e-5
        torch.testing.assert_close(torch.tensor(o.logprobs), want, atol=5e-5, rtol=0)
        top = lp.topk(3, -1)
        assert [[t for t, _ in row] for row in o.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in row] for row in o.top_logprobs]), top.values,
                                   atol=5e-5, rtol=0)


def test_cancel_frees_the_slot():
    m = tiny()
    eng = Engine(m, slots=1, max_len=64)
    a = eng.add(PROMPTS[0], SamplingParams(max_new_tokens=50))
    b = eng.add(PROMPTS[1], SamplingParams(max_new_tokens=6))
    c = eng.add(PROMPTS[2], SamplingParams(max_new_tokens=6))
    for _ in range(3):
        assert [ev.rid for ev in eng.step()] == [a]
    eng.cancel(a)
    eng.cancel(c)  # still waiting
    events = eng.step()
    assert [(ev.rid, ev.token, ev.finish_reason) for ev in events[:2]] == [(c, None, "cancelled"),
                                                                         (a, None, "cancelled")]
    assert [ev.rid for ev in events[2:]] == [b]  # b took a's slot in the same step
    outs = drain(eng)
    assert [events[2].token] + outs[b]["tokens"] == solo(m, PROMPTS[1], SamplingParams(max_new_tokens=6)).tokens
    assert set(outs) == {b} and not eng.requests
    eng.cancel(a)  # a finished request: nothing happens
    assert not eng.has_work()


def test_add_from_another_thread_while_stepping():
    m = tiny()
    params = SamplingParams(max_new_tokens=8)
    want = {i: solo(m, p, params).tokens for i, p in enumerate(PROMPTS)}
    eng = Engine(m, slots=3, max_len=64)
    rids = {}

    def client():
        for i, p in enumerate(PROMPTS * 3):
            rids[eng.add(p, params)] = i % len(PROMPTS)
            time.sleep(0.002)

    th = threading.Thread(target=client)
    th.start()
    outs = {}
    while th.is_alive() or eng.has_work():
        drain(eng, outs)
    th.join()
    drain(eng, outs)
    assert len(rids) == 3 * len(PROMPTS)
    assert all(outs[rid]["tokens"] == want[i] and outs[rid]["reason"] == "length" for rid, i in rids.items())


def test_bad_requests_are_refused_with_a_reason():
    eng = Engine(tiny(), slots=2, max_len=16)
    with pytest.raises(ValueError, match="empty"):
        eng.add([], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        eng.add([5, 101], SamplingParams())
    with pytest.raises(ValueError, match="max_len=16"):
        eng.add(list(range(17)), SamplingParams())
    with pytest.raises(ValueError, match="slots"):
        eng.add([5], SamplingParams(), n=3)
    # a row whose cache is full ends with "length"
    out = eng.generate([list(range(10))], SamplingParams(max_new_tokens=50))[0]
    assert len(out.tokens) == 16 - 10 + 1 and out.finish_reason == "length"


def test_cpu_kernel_choice_keeps_the_values():
    m = tiny(seed=1)
    m.lm_head.weight = m.embed_tokens.weight  # tied, as on small Qwen models
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want = m(ids)
    tune_cpu_kernels(m, batches=(1, 4))
    assert set(m.cpu_kernels["layouts"].values()) <= {"row", "col"} and set(m.cpu_kernels["head"]) == {1, 4}
    assert m.lm_head.weight is m.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(m(ids), want, atol=1e-5, rtol=0)
    eng = Engine(m, compile=True)
    assert eng.compile and not eng.graphs  # on CPU compiled too (fused element-wise ops), no CUDA graphs


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build")
def test_onednn_projections_only_in_inference_mode(monkeypatch, tmp_path):
    """Projections timed faster in oneDNN become KernelLinear: oneDNN under inference_mode (the engine),
    the plain F.linear for training and no_grad scoring; same parameters, state dict and saved files."""
    import nanohuatuo.cpu_kernels as ck
    seen = []
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(ck, "_measure", lambda ws, batches, head, pack=False, compiled=False, bias=False:
                        seen.append((tuple(ws[0].shape), len(ws), head)) or ("row", {b: "onednn" for b in batches}, False))
    m = tiny(seed=1)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want = m(ids)
    names = [n for n, _ in m.named_parameters()]
    tune_cpu_kernels(m, batches=(1, 4))
    # every layer's matrices of a shape are timed together, as a decode step streams them: q|k|v and
    # gate|up fused, o and down, then the head
    assert sorted(seen) == [((32, 32), 2, False), ((32, 48), 2, False), ((64, 32), 2, False), ((96, 32), 2, False),
                            ((101, 32), 1, True)]
    lin = m.layers[0].self_attn.o_proj
    assert type(lin) is ck.KernelLinear and lin.kernels == {1: "onednn", 4: "onednn"}
    assert [n for n, _ in m.named_parameters()] == names
    assert m.cpu_kernels["proj"][(32, 32)] == {1: "onednn", 4: "onednn"}
    calls = []
    monkeypatch.setattr(ck, "_onednn_linear", lambda x, w, b=None: calls.append(1) or F.linear(x, w, b))
    x = torch.randn(3, 2, lin.in_features, requires_grad=True)
    y = lin(x)  # training: F.linear, bit for bit, and gradients flow
    assert not calls and torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(m(ids), want) and not calls  # scoring keeps the plain kernel
    monkeypatch.undo()
    with torch.inference_mode():
        got = m(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    out = Engine(m).generate([PROMPTS[2]], SamplingParams(max_new_tokens=1))[0]
    assert out.tokens[0] == int(want[0, -1].argmax())
    m.save_pretrained(tmp_path / "m")
    back = Transformer.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(ids), want)


def test_fused_projections_follow_training_and_lora(tmp_path):
    """q|k|v and gate|up share one matrix while decoding: the projections' parameters are views of it,
    so an optimiser step reaches the fused product, and a LoRA wrapper loaded later adds its term."""
    from nanohuatuo.cpu_kernels import FusedLinear
    from nanohuatuo.lora import LoRALinear, apply_lora, disabled_adapters, merge_lora, unmerge_lora
    m = tiny(seed=2)
    ids = torch.tensor([PROMPTS[1]])
    tune_cpu_kernels(m, batches=(1, 4))
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert isinstance(attn.fused, FusedLinear) and isinstance(mlp.fused, FusedLinear)
    assert attn.q_proj.weight.data_ptr() == attn.fused.weight.data_ptr()
    x = torch.zeros(1, 1, 32)
    assert attn.fused.usable(x, (attn.q_proj, attn.k_proj, attn.v_proj)) is False  # not in inference mode

    def both():
        with torch.no_grad():
            plain = m(ids)
        with torch.inference_mode():
            assert attn.fused.usable(x, (attn.q_proj, attn.k_proj, attn.v_proj))
            return plain, m(ids)

    plain, fused = both()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    F.cross_entropy(m(ids)[0], torch.tensor(PROMPTS[1][1:] + [0])).backward()
    opt.step()
    m.eval()
    plain2, fused2 = both()  # the step moved the fused matrix with the projections
    assert (plain2 - plain).abs().max() > 1e-3
    torch.testing.assert_close(fused2, plain2, atol=1e-5, rtol=0)
    apply_lora(m, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj"])
    for p in m.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)  # B non-zero: the adapter changes the output
    plain3, fused3 = both()
    assert type(attn.q_proj) is LoRALinear and (plain3 - plain2).abs().max() > 1e-3
    torch.testing.assert_close(fused3, plain3, atol=1e-5, rtol=0)
    with disabled_adapters(m):  # the reference model of PPO: adapters off, the fused base alone
        plain4, fused4 = both()
    torch.testing.assert_close(plain4, plain2, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused4, plain4, atol=1e-5, rtol=0)
    merge_lora(m)  # merged into the base weights, so into the fused matrix: no term added twice
    plain5, fused5 = both()
    torch.testing.assert_close(plain5, plain3, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused5, plain3, atol=1e-5, rtol=0)
    unmerge_lora(m)
    m.save_pretrained(tmp_path / "m")  # views of the fused matrix are saved as tensors of their own


def test_fused_projections_under_lora_as_rl_rollouts_decode(monkeypatch):
    """The PPO/GRPO policy: LoRA wrappers first, then the kernels tuned (rollout.policy_model). The bases
    of q|k|v and gate|up are fused under their wrappers; sampled log-probs match a plain forward's."""
    from nanohuatuo.cpu_kernels import FusedLinear
    from nanohuatuo.generate import generate_batch
    from nanohuatuo.lora import apply_lora, lora_parameters
    m = tiny(seed=3)
    apply_lora(m, r=4, alpha=8, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.normal_(0, 0.3, generator=g)  # B non-zero and every adapter different
    tune_cpu_kernels(m, batches=(1, 4))
    attn, mlp = m.layers[1].self_attn, m.layers[1].mlp
    assert attn.fused is not None and mlp.fused is not None
    assert attn.q_proj.base.weight.data_ptr() == attn.fused.weight.data_ptr()
    calls, real = [], FusedLinear.__call__
    monkeypatch.setattr(FusedLinear, "__call__", lambda self, x, parts: calls.append(1) or real(self, x, parts))
    gen = generate_batch(m, [PROMPTS[0], PROMPTS[1]], 6, temperature=1.0, seed=5, return_logprobs=True)
    assert calls  # decoding went through the fused products
    for prompt, tokens, lp in zip([PROMPTS[0], PROMPTS[1]], gen.tokens, gen.logprobs):
        with torch.no_grad():
            logits = m(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float()
        want = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp), want, atol=1e-4, rtol=0)


class _Counted(list):
    """cpu_kernels._OPAQUE, counting the products that compiled decode steps ran (each reads its entry once)."""
    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build")
@pytest.mark.parametrize("kind", ["packed", "lora", "bfloat16", "reduce", "reduce-lora", "reduce-bfloat16"])
def test_compiled_cpu_decode_gives_the_eager_tokens(monkeypatch, kind):
    """compile=True on CPU: torch.compile fuses the element-wise work between the products, and every
    measured product (a KernelLinear, a fused q|k|v or gate|up) runs as it does eagerly, one opaque op.
    A model loaded to infer with every matrix packed, a LoRA policy decoding rollouts (adapters on
    the fused bases), and a bfloat16 model (the fused loops round where eager ops round): requests
    joining and leaving get the eager engine's greedy tokens. "reduce": the matrices row-major with
    the compiler's reduction chosen at batch 1 (`_measure`'s third answer), so the batch-1 graph
    reads them with its own loops (no opaque op) and larger batches with the ops, the LoRA terms
    added to the fused bases' parts in both, in bfloat16 summed in float32 as the kernels sum."""
    import nanohuatuo.cpu_kernels as ck
    from nanohuatuo.generate import for_inference
    from nanohuatuo.lora import apply_lora, lora_parameters
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(ck, "_measure", lambda ws, batches, head, pack=False, compiled=False, bias=False:
                        ("packed" if pack and "reduce" not in kind else "row", {b: "onednn" for b in batches},
                         "reduce" in kind and compiled))
    monkeypatch.setattr(ck, "_OPAQUE", _Counted())

    def model():
        m = tiny(seed=4)
        if kind.endswith("lora"):
            apply_lora(m, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "o_proj", "up_proj"])
            g = torch.Generator().manual_seed(4)
            with torch.no_grad():
                for p in lora_parameters(m):
                    p.normal_(0, 0.3, generator=g)
            return m
        return for_inference(m.to(torch.bfloat16) if kind.endswith("bfloat16") else m)

    lengths = [9, 3, 14, 6, 11]

    def run(compile):
        eng = Engine(model(), slots=3, max_len=64, compile=compile)
        rids = [eng.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS[:3], lengths[:3])]
        outs = {}
        for _ in range(4):
            for ev in eng.step():
                outs.setdefault(ev.rid, []).append(ev.token)
        rids += [eng.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS[3:5], lengths[3:])]
        while eng.has_work():
            for ev in eng.step():
                outs.setdefault(ev.rid, []).append(ev.token)
        return eng, [outs[r] for r in rids]

    _, want = run(False)
    steps, decode = [], Engine._decode
    monkeypatch.setattr(Engine, "_decode", lambda self: steps.append(len(self.running)) or decode(self))
    eng, got = run(True)
    assert got == want and [len(t) for t in got] == lengths
    assert eng.compile and not eng.graphs
    if kind == "packed" or kind == "bfloat16" and ck._ONEDNN_BF16:
        assert eng.model.layers[0].self_attn.fused.weight.is_mkldnn
    elif kind.endswith("lora"):
        assert type(eng.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    # each compiled decode step ran q|k|v, o, gate|up and down in each layer and the head as opaque ops,
    # but for the batch-1 steps where the compiler's reduction was chosen
    opaque = [n for n in steps if n > 1 or "reduce" not in kind]
    assert ck._OPAQUE.reads == len(opaque) * (2 * 4 + 1) > 0 and (len(opaque) < len(steps)) == ("reduce" in kind)
    assert eng.model.cpu_kernels["reduce"] == ([(64, 32), (96, 32), (32, 32), (32, 48), "head"] if "reduce" in kind else [])


@pytest.mark.parametrize("graphs", ["trees", "manual"])
def test_cuda_graph_decode_path_gives_the_eager_tokens(monkeypatch, graphs):
    """The compiled path CUDA takes, run on CPU (no CUDA graphs are recorded there, the rest is the
    same): torch.compile with CUDA's options, the batch padded up to a bucket by idle rows at
    position 0, every step over all max_len keys behind the mask, a static cache. Requests joining
    and leaving (4, 3 padded to 4, 2, 1 running) get the eager engine's greedy tokens. "trees":
    torch.compile's own CUDA graphs; "manual": the engine's (`GraphedDecode`, NANOHUATUO_CUDA_GRAPHS=manual),
    one recorded per batch size at its first step, the capture stood in for by a replay that runs the
    step again on the graph's own input tensors: the engine's tokens and positions must be copied
    into them at every step."""
    import nanohuatuo.engine as engine_mod
    import nanohuatuo.engine_runner as runner
    monkeypatch.setenv("NANOHUATUO_CPU_KERNELS", "fixed")  # plain products, as on CUDA
    m = tiny(seed=6)
    lengths = [5, 12, 3, 9, 7]

    def run(compile):
        eng = Engine(m, slots=4, max_len=48, compile=compile)
        rids = [eng.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]
        outs = {}
        while eng.has_work():
            for ev in eng.step():
                outs.setdefault(ev.rid, []).append(ev.token)
        return eng, [outs[r] for r in rids]

    _, want = run(False)
    monkeypatch.setattr(engine_mod, "cuda_graphs", lambda device: True)
    monkeypatch.setattr(runner, "_COMPILED", {})
    shapes, real = [], runner.compiled_decode

    def compiled_decode(device_type="cuda", trees=True):
        step = real(device_type, trees)
        return lambda model, tokens, *rest: shapes.append(tokens.shape[0]) or step(model, tokens, *rest)
    monkeypatch.setattr(engine_mod, "compiled_decode", compiled_decode)
    monkeypatch.setattr(runner, "compiled_decode", compiled_decode)
    recorded = []
    if graphs == "manual":
        monkeypatch.setenv("NANOHUATUO_CUDA_GRAPHS", "manual")

        def record(fn):  # nothing to record on CPU: the warm-up, the "capture", then each replay a run
            fn()
            out = fn()
            recorded.append(out.shape[0])
            return (lambda: out.copy_(fn())), out
        monkeypatch.setattr(runner, "_record", record)
    eng, got = run(True)
    assert got == want and [len(t) for t in got] == lengths
    assert eng.graphs and m.engine_cache is not None and eng.k is m.engine_cache[0]
    # 3 running rows went as 4; one compilation without torch.compile's graphs where the engine records its own
    assert set(shapes) == {1, 2, 4} and set(runner._COMPILED) == {"cuda" if graphs == "trees" else "cuda-kernels"}
    assert (eng.graphed is not None) == (graphs == "manual") and sorted(recorded) == ([1, 2, 4] if graphs == "manual" else [])
    assert len(recorded) == (3 if graphs == "manual" else 0)


def test_compiled_cpu_decode_without_a_compiler_warns_and_decodes_eagerly(monkeypatch):
    """torch.compile needs a C++ compiler on CPU; where it fails the engine says why, once, and goes on eagerly."""
    import nanohuatuo.engine as engine_mod

    def fails(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(fails, RuntimeError("No working C++ compiler found"), None)
    m = tiny(seed=5)
    want = Engine(m, slots=2, max_len=64).generate(PROMPTS[:2], SamplingParams(max_new_tokens=5))
    monkeypatch.setattr(engine_mod, "compiled_decode", lambda device_type: fails)
    eng = Engine(m, slots=2, max_len=64, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed on cpu .*No working C.. compiler.*decodes eagerly"):
        got = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5))
    assert [o.tokens for o in got] == [o.tokens for o in want] and not eng.compile


@pytest.mark.parametrize("lora", [False, True])
def test_one_slot_eager_matrices_read_by_the_compiled_reduction_give_the_same_tokens(monkeypatch, lora):
    """A one-slot eager engine's matrices (chat's) may each be read by the compiler's reduction, compiled
    alone and called once a step per matrix (`reduce_eager` of KernelLinear, FusedLinear): it is timed
    among their kernels (here for tiny matrices, the size floor lowered), and where chosen every one-row
    product goes through it, in inference mode, with plain tensors and q|k|v's bias, as timed (so nothing
    compiles again at the first step); the greedy tokens and the logits are F.linear's on the loaded
    layout. Under LoRA adapters (a policy's) the bases are reduced and the adapters' terms added. An
    engine with two slots does not time it."""
    from nanohuatuo.lora import LoRALinear, apply_lora, lora_parameters
    import nanohuatuo.cpu_kernels as ck
    import nanohuatuo.cpu_reduction as cpu_reduction
    from torch._dynamo.utils import counters
    if cpu_reduction.product_kernel() is None:
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler)")
    lengths = [9, 3, 14]

    def model():  # q, k and v with non-zero biases, as Qwen2's
        m = tiny(seed=7)
        m.config.qkv_bias = True
        for a in (layer.self_attn for layer in m.layers):
            for p in (a.q_proj, a.k_proj, a.v_proj):
                p.bias = torch.nn.Parameter(torch.randn(p.out_features, generator=torch.Generator().manual_seed(p.out_features)))
        if lora:
            apply_lora(m, r=4, alpha=8, dropout=0.0, targets="all-linear")
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for p in lora_parameters(m):
                    p.normal_(0, 0.1, generator=g)
        return m

    def run(tuned=lambda eng: None):
        eng = Engine(model(), slots=1, max_len=64)
        tuned(eng)
        rids = [eng.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]
        outs = drain(eng)
        return eng, [outs[r]["tokens"] for r in rids]

    monkeypatch.setenv("NANOHUATUO_CPU_KERNELS", "fixed")
    _, want = run()
    monkeypatch.delenv("NANOHUATUO_CPU_KERNELS")
    monkeypatch.setattr(ck, "_MEASURED", {})
    monkeypatch.setattr(cpu_reduction, "EAGER_MIN_BYTES", 0)
    timed, reduce_each, measure, kernel = [], ck.reduce_each, ck._measure, cpu_reduction.product_kernel()
    monkeypatch.setattr(ck, "reduce_each", lambda x, ws, **kw: timed.append(len(ws)) or reduce_each(x, ws, **kw))

    def measured(ws, batches, head, pack=False, compiled=False, bias=False):  # the reduction chosen where timed
        before = len(timed)
        layout, kernels, reduce = measure(ws, batches, head, pack=pack, compiled=compiled, bias=bias)
        return ("row", kernels, True) if len(timed) > before else (layout, kernels, reduce)
    monkeypatch.setattr(ck, "_measure", measured)
    calls = []  # (rows, compiled graphs so far) at each call of the compiled product

    def product(x, w, b=None, s=None):
        y = kernel(x, w, b, s)
        calls.append((x.shape[0], counters["stats"]["unique_graphs"]))
        return y
    monkeypatch.setattr(cpu_reduction, "product_kernel", lambda: product)  # the timing's calls and the steps'
    steps, decode = [], Engine._decode
    monkeypatch.setattr(Engine, "_decode", lambda self: steps.append(len(self.running)) or decode(self))
    graphs = []
    eng, got = run(lambda eng: graphs.append(counters["stats"]["unique_graphs"]) or calls.clear())
    assert got == want and [len(t) for t in got] == lengths
    m = eng.model
    head, attn, mlp = m.lm_head, m.layers[0].self_attn, m.layers[0].mlp
    o, down = (x.base if lora else x for x in (attn.o_proj, mlp.down_proj))
    assert lora == (type(attn.o_proj) is type(attn.q_proj) is LoRALinear)
    assert type(head) is type(o) is type(down) is ck.KernelLinear
    assert type(attn.fused) is type(mlp.fused) is ck.FusedLinear and attn.fused.bias is not None
    assert all(x.reduce_eager and not x.reduce for x in (head, o, down, attn.fused, mlp.fused))
    # q|k|v (32 + 16 + 16, 32), gate|up (2 * 48, 32), o (32, 32), down (32, 48), the head
    assert sorted(map(str, m.cpu_kernels["reduce"])) == sorted(map(str, [(64, 32), (96, 32), (32, 32), (32, 48), "head"]))
    # every step's nine products (four a block, the head) through the compiled product, which compiled
    # nothing more after the timing
    assert len(calls) >= 9 * len(steps) > 0 and {n for n, _ in calls} == {1} and {g for _, g in calls} == set(graphs)
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    calls.clear()
    with torch.inference_mode():
        for rows in (h[:1], h):  # one row through the reduction, two through the eager kernel
            torch.testing.assert_close(ck.head_logits(m, rows), F.linear(rows, head.weight), atol=1e-5, rtol=0)
            q, k, v = attn.fused(rows, (attn.q_proj, attn.k_proj, attn.v_proj))
            want = F.linear(rows, attn.k_proj.weight, attn.k_proj.bias)
            torch.testing.assert_close(k, want + attn.k_proj.delta(rows) if lora else want, atol=1e-5, rtol=0)
    assert len(calls) == 2
    timed.clear()
    eng = Engine(model(), slots=2, max_len=64)
    assert not timed and not getattr(eng.model.lm_head, "reduce_eager", False)


def test_one_slot_eager_margin_is_a_block_matrix_s_and_not_the_head_s(monkeypatch):
    """In a one-slot eager engine a block's matrix takes the reduction called alone only where it was timed
    `EAGER_MARGIN` faster than the best other kernel; the output head (float or int8) wherever it was
    timed faster at all, as inside a compiled graph."""
    import nanohuatuo.cpu_int8 as cpu_int8
    import nanohuatuo.cpu_kernels as ck
    import nanohuatuo.cpu_reduction as cpu_reduction
    from nanohuatuo.quant import quantize_int8
    wins = cpu_reduction.reduction_wins
    m = cpu_reduction.EAGER_MARGIN
    assert wins(0.99, 1.0, alone=False) and not wins(1.0, 1.0, alone=False)
    assert not wins(m + 0.01, 1.0, alone=True) and wins(m - 0.01, 1.0, alone=True)
    assert wins(0.99, 1.0, alone=True, head=True) and not wins(1.0, 1.0, alone=True, head=True)
    if cpu_reduction.product_kernel() is None:
        pytest.skip("torch.compile cannot build a CPU kernel here (no C++ compiler)")
    monkeypatch.setattr(cpu_reduction, "EAGER_MIN_BYTES", 0)
    for int8 in (False, True):
        monkeypatch.setattr(ck, "_MEASURED", {})
        monkeypatch.setattr(cpu_int8, "_MEASURED", {})
        asked = []  # (head?, margin-free?) for each decision

        def recorded(reduced, best, alone, head=False):
            asked.append((head, alone))
            return wins(reduced, best, alone, head)
        monkeypatch.setattr(ck, "reduction_wins", recorded)
        monkeypatch.setattr(cpu_int8, "reduction_wins", recorded)
        model = tiny(seed=2)
        if int8:
            quantize_int8(model)
        tune_cpu_kernels(model, batches=(1,))
        # the blocks' distinct shapes (q|k|v, gate|up, o, down) once each, the head once, all called alone
        assert sorted(asked) == [(False, True)] * 4 + [(True, True)], (int8, asked)


def test_fixed_cpu_kernels_time_nothing_and_keep_the_loaded_layout(monkeypatch):
    """NANOHUATUO_CPU_KERNELS=fixed: repeatable runs (no choice made by timing, which can differ run to run)."""
    import nanohuatuo.cpu_kernels as ck
    monkeypatch.setenv("NANOHUATUO_CPU_KERNELS", "fixed")
    monkeypatch.setattr(ck, "_measure", lambda *a, **k: pytest.fail("timed a kernel"))
    m = tiny(seed=1)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want = m(ids)
    tune_cpu_kernels(m, batches=(1, 4))
    assert m.cpu_kernels["layouts"] == {} and m.cpu_kernels["head"] == {}
    assert all(p.is_contiguous() for p in m.parameters())
    eng = Engine(m)
    out = eng.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4))[0]
    with torch.no_grad():
        assert torch.equal(m(ids), want) and out.tokens[0] == int(want[0, -1].argmax())


def test_native_bf16_reads_the_processor_flags(tmp_path):
    """bfloat16 instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16) from the kernel's flags; none, or no file: no."""
    from nanohuatuo.cpu_kernels import native_bf16
    cases = {"flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n": False,  # AVX-512 without BF16
             "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n": True,
             "flags\t\t: fpu avx512f amx_tile amx_bf16\n": True,
             "Features\t: fp asimd sve bf16 i8mm\n": True,
             "Features\t: fp asimd\n": False}
    for i, (text, want) in enumerate(cases.items()):
        path = tmp_path / f"cpuinfo{i}"
        path.write_text("processor\t: 0\n" + text)
        assert native_bf16(str(path)) is want, text
    assert native_bf16(str(tmp_path / "missing")) is False
