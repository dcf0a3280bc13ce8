"""Generation (the wrappers over the engine): greedy == transformers, batched == alone, cache ==
recompute, sampling, stops."""

import pytest
import torch

from nanohuatuo import Transformer
from nanohuatuo.generate import generate, generate_batch, stream, cut_at_stop, process_logits, sample
from nanohuatuo.engine_runner import RowCache, decode_logits, forward, key_mask, kv_cache
from nanohuatuo.token_sampling import sample_seed

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "bloom"]
PROMPTS = [[5, 17, 3, 88, 42, 9, 1], [7, 7, 60], [99, 12, 31, 4, 4, 70, 2, 8, 15, 23]]


def _hf_greedy(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_matches_transformers(hf_dirs, kind):
    path, ref = hf_dirs(kind)
    ours = Transformer.from_pretrained(path)
    for p in PROMPTS:
        assert generate(ours, [p], max_new_tokens=12) == [_hf_greedy(ref, p, 12)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bloom"])
def test_batched_equals_one_by_one(hf_dirs, kind):
    path, _ = hf_dirs(kind)
    ours = Transformer.from_pretrained(path)
    alone = [generate(ours, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert generate(ours, PROMPTS, max_new_tokens=10) == alone


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "bloom", "mistral_window"])
def test_cached_decode_logits_equal_full_recompute(hf_dirs, kind):
    path, _ = hf_dirs(kind)
    m = Transformer.from_pretrained(path)
    seq = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    T = seq.shape[1]
    with torch.no_grad():
        full = m(seq)
        k, v = kv_cache(m, 1, T, torch.float32, "cpu", static=False)  # the engine's cache and runner
        pos = torch.arange(4)[None]
        h = forward(m, seq[:, :4], pos, RowCache(k, v, 0, pos, 4), key_mask(m, pos, 4, torch.float32))
        steps = [m.logits(h)]
        for t in range(4, T):
            steps.append(decode_logits(m, seq[:, t], torch.tensor([t]), k, v, t + 1)[:, None])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "bloom", "mistral_window"])
def test_decode_rows_at_one_position_equal_the_masked_step(hf_dirs, kind):
    # rows all at one position: keys written as a slice and (RoPE without a shorter window) no mask;
    # the logits and the cache must be those of the general step, bit for bit
    path, _ = hf_dirs(kind)
    m = Transformer.from_pretrained(path)
    prompts = torch.tensor([[3, 14, 15, 92, 65, 35, 89], [79, 32, 38, 46, 26, 43, 38]])
    B, P = prompts.shape
    caches, logits = [], []
    with torch.no_grad():
        for same in (False, True):
            k, v = kv_cache(m, B, P + 4, torch.float32, "cpu", static=False)
            pos = torch.arange(P - 1)[None].expand(B, P - 1)
            forward(m, prompts[:, :-1], pos, RowCache(k, v, 0, pos, P - 1, start=0 if same else None),
                    key_mask(m, pos, P - 1, torch.float32))
            tok, out = prompts[:, -1], []
            for t in range(P - 1, P + 3):
                out.append(decode_logits(m, tok, torch.full((B,), t), k, v, t + 1, same_position=same))
                tok = out[-1].argmax(-1)
            caches.append(k + v)
            logits.append(torch.stack(out))
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(*caches))


def test_sampling_draws_from_the_distribution_and_never_a_masked_token():
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, 2.0, float("-inf")],  # masked first and last tokens
                           [3.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, g) for _ in range(20000)])  # (20000, 2)
    assert (draws[:, 1] == 0).all()
    freq = torch.bincount(draws[:, 0], minlength=5).double() / len(draws)
    assert freq[0] == 0 and freq[4] == 0
    # within 4 standard errors of the softmax probabilities
    torch.testing.assert_close(freq, logits[0].double().softmax(-1), atol=4 * (0.25 / len(draws)) ** 0.5, rtol=0)
    assert sample(logits, 0.0, g).tolist() == [3, 0]


def test_same_seed_same_sample_and_logprobs(hf_dirs):
    path, _ = hf_dirs("llama")
    m = Transformer.from_pretrained(path)
    kw = dict(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.9, seed=123, return_logprobs=True)
    a = generate_batch(m, PROMPTS, **kw)
    b = generate_batch(m, PROMPTS, **kw)
    c = generate_batch(m, PROMPTS, **dict(kw, seed=124))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    # log-probs are those of the sampled tokens under logits / temperature, computed by a full forward
    p = PROMPTS[0]
    seq = torch.tensor([p + a.tokens[0]])
    with torch.no_grad():
        lp = torch.log_softmax(m(seq)[0, len(p) - 1:-1] / 0.9, -1)
    want = lp.gather(-1, torch.tensor(a.tokens[0])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(a.logprobs[0]), want, atol=1e-4, rtol=0)


def test_rows_of_a_seeded_batch_are_independent_samples(hf_dirs):
    path, _ = hf_dirs("llama")
    m = Transformer.from_pretrained(path)
    g = generate_batch(m, [PROMPTS[0]] * 3 + [PROMPTS[1]], 10, temperature=1.0, seed=7)
    assert len({tuple(t) for t in g.tokens[:3]}) == 3  # copies of one prompt are different samples
    # row i has its own seed, so it gets what it gets alone with that seed
    assert generate(m, [PROMPTS[1]], 10, temperature=1.0, seed=sample_seed(7, 3)) == [g.tokens[3]]
    assert generate(m, [PROMPTS[0]], 10, temperature=1.0, seed=7) == [g.tokens[0]]


def test_stop_ids_and_streaming(hf_dirs):
    path, _ = hf_dirs("qwen2")
    m = Transformer.from_pretrained(path)
    free = generate(m, [PROMPTS[0]], max_new_tokens=12)[0]
    stop = free[4]
    first = free.index(stop)
    g = generate_batch(m, [PROMPTS[0]], max_new_tokens=12, stop_ids=[stop])
    assert g.tokens[0] == free[:first + 1] and g.finished == [True]
    assert list(stream(m, PROMPTS[0], 12, stop_ids=[stop])) == free[:first + 1]
    assert list(stream(m, PROMPTS[0], 12)) == free


class CharTok:
    """One token per character: enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_exactly(hf_dirs):
    path, _ = hf_dirs("llama")
    m = Transformer.from_pretrained(path)
    tok = CharTok()
    free = generate(m, [PROMPTS[2]], max_new_tokens=12)[0]
    text = tok.decode(free)
    stop = text[5:7]  # a two-character stop string that first completes at token index 6 or earlier
    end = text.find(stop) + len(stop)
    g = generate_batch(m, [PROMPTS[2]], max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    assert g.tokens[0] == free[:end] and g.finished == [True]
    assert cut_at_stop(tok.decode(g.tokens[0]), [stop]) == text[:text.find(stop)]
    with pytest.raises(ValueError, match="tokenizer"):
        generate_batch(m, [PROMPTS[2]], 3, stop_strings=["x"])


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 6))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        want = w(ids, want)
    got = process_logits(logits, 0.7, 10, 0.8, 1.3, seen)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_int8_close_to_float_and_smaller(hf_dirs):
    from nanohuatuo.quant import quantize_int8, Int8Linear
    path, _ = hf_dirs("qwen2")
    m = Transformer.from_pretrained(path)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want = m(ids)
    n = quantize_int8(m)
    assert n == 2 * 7 + 1 and isinstance(m.lm_head, Int8Linear)
    with torch.no_grad():
        got = m(ids)
    # per-row int8 keeps logits within ~1% of their spread on this model
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert m.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert len(generate(m, [PROMPTS[0]], max_new_tokens=5)[0]) == 5
