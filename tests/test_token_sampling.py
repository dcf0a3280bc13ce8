"""token_sampling: the CPU argmax by chunks is torch.argmax; sampling, top-p and the log-probs give
what the code they replaced gave (kept in bench/token_sampling.py); the allocator setting of
generation (heap.keep_large_blocks) keeps freed blocks for reuse."""

import os

import pytest
import torch

from conftest import bench_module
from nanohuatuo.token_sampling import greedy_tokens, process_rows, sample_rows, top_p_drop


@pytest.mark.parametrize("V", [151936, 4096, 5000, 1500, 7])
def test_greedy_tokens_is_argmax(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(6, V, generator=g)
    x[1, V - 1] = 10.0  # the max in the last (shorter) chunk
    x[2] = 0.0  # every logit tied: the first
    x[3, V // 3] = x[3, V - 2] = 9.0  # a tie across chunks: the first of the two
    x[4] = float("-inf")
    x[4, V // 2:] = 1.0  # masked below, ties above
    x[5, V // 2] = float("nan")  # a NaN counts as the largest, as in argmax
    assert torch.equal(greedy_tokens(x), x.argmax(-1))
    xb = x.bfloat16()  # fewer distinct values: more ties
    assert torch.equal(greedy_tokens(xb), xb.argmax(-1))
    for chunk in (1, 3, 64):
        assert torch.equal(greedy_tokens(x, chunk), x.argmax(-1))


def bench_sampling():
    """bench/token_sampling.py as a module (it keeps the sampler as it was)."""
    return bench_module("token_sampling")


@pytest.mark.parametrize("temperature", [[1.0] * 4, [0.0, 0.7, 0.0, 1.3], [0.0] * 4])
def test_sample_rows_draws_what_it_drew_before(temperature):
    V = 3000
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3
    # top-k and top-p masks leave -inf logits, tokens without mass, at both ends of the vocabulary
    x = process_rows(logits, temperature, [0, 50, 0, 5], [0.9, 1.0, 0.5, 1.0], [1.0] * 4, None)
    new = [torch.Generator().manual_seed(s) for s in range(4)]
    old = [torch.Generator().manual_seed(s) for s in range(4)]
    before = bench_sampling().sample_rows_before
    for _ in range(200):
        tok = sample_rows(x, temperature, new)
        assert torch.equal(tok, before(x, temperature, old))
        assert torch.isfinite(x.gather(-1, tok[:, None])).all()  # never a masked token


def test_a_uniform_at_the_total_takes_a_token_with_mass(monkeypatch):
    """A uniform that rounds to the total finds no entry above it: the token is then the first one
    where the cumulative sum reaches the total, which has mass, never one past the vocabulary."""
    x = torch.full((2, 10), float("-inf"))
    x[0, [2, 5]] = 0.0
    x[1, 9] = 0.0
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, dtype=torch.float64))
    assert sample_rows(x, [1.0, 1.0], [None, None]).tolist() == [5, 9]


def test_the_benchmark_runs_and_finds_the_same_tokens(tmp_path, capsys):
    import json
    out = tmp_path / "s.json"
    assert bench_sampling().main(["--batches", "1", "3", "--vocab", "5000", "--rounds", "1", "--calls", "2",
                                  "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    whats = ["greedy", "sampled", "top-p", "top-k, top-p", "Qwen's defaults", "log-probs"]
    assert [(r["rows"], r["what"]) for r in rows] == [(n, w) for n in (1, 3) for w in whats]
    assert all(r["same_tokens"] for r in rows) and "| 3 | sampled |" in capsys.readouterr().out


@pytest.mark.parametrize("V", [151936, 3000])
def test_top_p_drops_what_the_full_sort_dropped(V, monkeypatch):
    """Each of top_p_drop's ways gives the full sort's tokens: rows left with few finite logits by
    top-k (laid out as the sort lays them), peaked rows (the candidates hold the mass), flat rows
    (sorted in full), rows with top-p off, and -inf / tied logits."""
    before = bench_sampling().top_p_drop_before
    g = torch.Generator().manual_seed(V)
    x = torch.randn(8, V, generator=g)
    x[:2] *= 8  # peaked: the top 1,024 hold more than p
    x[4, :V // 2] = float("-inf")  # masked half, still more finite logits than candidates
    x[5] = torch.randn(V, generator=g).round()  # many ties
    ps = [0.9, 0.5, 0.8, 1.0, 0.95, 0.7, 0.6, 0.99]
    top = process_rows(x, [1.0] * 8, [20, 0, 50, 0, 5, 0, 1024, 0], [1.0] * 8, [1.0] * 8, None)
    real_sort, sorted_rows = torch.sort, []

    def sort(t, *a, **k):
        sorted_rows.append(t.shape[0])
        return real_sort(t, *a, **k)

    monkeypatch.setattr(torch, "sort", sort)
    for logits in (x, top):
        sorted_rows.clear()
        got = top_p_drop(logits, ps)
        # flat rows are sorted (their top 1,024 hold too little), the peaked and top-k ones not
        assert sorted_rows == [{(151936, True): 5, (151936, False): 2, (3000, True): 3, (3000, False): 1}[
            V, logits is x]]  # in one sort
        want = before(logits, ps)
        assert torch.equal(got[[0, 1, 2, 3, 4, 6, 7]], want[[0, 1, 2, 3, 4, 6, 7]])
        # row 5's ties at the boundary: as many kept, of the same values (which of equal logits the
        # full sort keeps is its order of equal values, not a property of top-p)
        assert torch.equal(logits[5][~got[5]].sort().values, logits[5][~want[5]].sort().values)
        assert not got[3].any()  # top-p off
        assert (~got).sum(-1).min() >= 1  # the most likely token always stays
    assert not top_p_drop(x[:3], [1.0, 1.0, 1.0]).any()  # no row asks for top-p: none go (no topk over none)


def test_token_logprobs_are_log_softmax_over_all_rows():
    """A few rows at a time, the values of one log_softmax over every row, bit for bit."""
    from nanohuatuo.token_sampling import rows_at_once, token_logprobs
    x = torch.randn(9, 151936, generator=torch.Generator().manual_seed(1)) * 4
    assert rows_at_once(x) < 9  # in blocks
    temperature = [0.7, 0.0, 1.0, 1.3, 0.7, 0.0, 2.0, 0.5, 1.0]
    tokens = torch.randint(0, 151936, (9,), generator=torch.Generator().manual_seed(2))
    lp, (values, indices) = token_logprobs(x, temperature, tokens, 5)
    want = torch.log_softmax(x / torch.tensor([t if t > 0 else 1.0 for t in temperature])[:, None], -1)
    assert torch.equal(lp, want.gather(-1, tokens[:, None]).squeeze(-1))
    top = want.topk(5, dim=-1)
    assert torch.equal(values, top.values) and torch.equal(indices, top.indices)
    assert token_logprobs(x, temperature, tokens)[1] is None


def test_large_blocks_are_kept_while_generating_and_returned_after(monkeypatch):
    """keep_large_blocks: a freed 8 MiB temporary comes back from the heap without fresh pages,
    where return_large_blocks maps it afresh (glibc); large_blocks_kept goes back to the training
    process's return_large_blocks after, or to glibc's own largest thresholds."""
    import subprocess
    import sys
    import nanohuatuo.heap as heap
    # in a fresh process: in this one, earlier tests' freed memory may serve the blocks either way
    script = """
import resource, sys, torch
import nanohuatuo.heap as heap
def faults():
    for _ in range(3):
        torch.empty(2 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(2 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if not heap.return_large_blocks():
    sys.exit(3)
mapped = faults()
# kept: the fewest of three measures (on a busy machine the kernel may reclaim idle heap pages between
# rounds: one CI run counted 14,337 faults where the heap itself had grown a few times)
print(mapped, heap.keep_large_blocks() and min(faults() for _ in range(3)))
"""
    # on 4 KB pages, the faults counted (in huge pages, which `import nanohuatuo` asks for, 8 MiB is 4 faults)
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="0")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    if run.returncode == 3:
        pytest.skip("not glibc")
    assert run.returncode == 0, run.stderr
    mapped, kept = map(int, run.stdout.split())
    assert mapped > 20 * 1000  # 8 MiB mapped afresh each time: 2,048 pages
    assert kept < mapped / 3  # kept: the heap grown a few times at most (2,048-8,192 faults in 20 rounds here)

    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda *a: calls.append(a) or True)
    monkeypatch.setattr(heap, "_RETURNED", None)
    with heap.large_blocks_kept():
        pass
    assert calls == [(64 << 20, 256 << 20), (32 << 20, 64 << 20)]  # glibc's own largest after
    calls.clear()
    assert heap.return_large_blocks()
    with heap.large_blocks_kept():
        assert calls == [(1 << 20,), (64 << 20, 256 << 20)]
    assert calls[-1] == (1 << 20, 128 << 10) and heap._RETURNED == 1 << 20


def test_next_tokens_in_blocks_choose_what_the_previous_choice_chose():
    """The engine's choice, a few rows at a time, against the previous one over every row at once
    (bench/token_sampling.py's next_tokens_before): greedy, sampled, top-k, top-p and penalised
    rows mixed, over more rows than one block."""
    from nanohuatuo.token_sampling import next_tokens, rows_at_once
    before = bench_sampling().next_tokens_before
    B, V = 9, 151936
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(3)) * 4
    assert rows_at_once(logits) < B  # more than one block
    seen = torch.zeros(B, V, dtype=torch.bool)
    seen[:, torch.randperm(V, generator=torch.Generator().manual_seed(4))[:200]] = True
    settings = ([0.0, 0.7, 1.0, 0.7, 0.0, 1.3, 0.7, 1.0, 0.5],  # temperature
                [0, 20, 0, 0, 0, 50, 20, 0, 5],  # top-k
                [1.0, 0.8, 0.9, 1.0, 1.0, 0.95, 1.0, 0.5, 1.0],  # top-p
                [1.0, 1.05, 1.0, 1.2, 1.1, 1.0, 1.05, 1.0, 1.0])  # repetition penalty
    new = [torch.Generator().manual_seed(s) for s in range(B)]
    old = [torch.Generator().manual_seed(s) for s in range(B)]
    for _ in range(20):
        assert torch.equal(next_tokens(logits, *settings, seen, new), before(logits, *settings, seen, old))


def test_huge_pages_are_asked_for_before_torch_allocates(tmp_path, monkeypatch):
    """`import nanohuatuo` sets THP_MEM_ALLOC_ENABLE=1 where the kernel gives huge pages on request
    ("[madvise]"), before torch reads it at its first allocation (a fresh process: a 4 MB tensor then
    starts on a page boundary, as PyTorch aligns the buffers it advises); never over the user's own
    setting, and not under "[always]" or "[never]" or without the file."""
    import subprocess
    import sys
    import nanohuatuo.heap as heap
    thp = tmp_path / "enabled"
    for text, set_it in [("always madvise [never]\n", False), ("[always] madvise never\n", False),
                         ("always [madvise] never\n", True)]:
        thp.write_text(text)
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
        assert heap.huge_pages_for_large_tensors(str(thp)) == set_it
        assert os.environ.get("THP_MEM_ALLOC_ENABLE") == ("1" if set_it else None)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert not heap.huge_pages_for_large_tensors(str(thp)) and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert not heap.huge_pages_for_large_tensors(str(tmp_path / "missing"))
    if not sys.platform.startswith("linux") or not heap.huge_pages_for_large_tensors():
        pytest.skip("no transparent huge pages on request here")
    script = "import torch, nanohuatuo.engine, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'), " \
             "[torch.empty(1 << 20).data_ptr() % 4096 for _ in range(4)])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split(None, 1)[0] == "1" and run.stdout.split(None, 1)[1].strip() == "[0, 0, 0, 0]"
