"""Tests for nanohuatuo.sft: loss mask, loss value, accumulation, resume, torchrun, outputs, errors.

A tiny Llama-shaped model (dim 32, 2 layers) with a sentencepiece tokenizer trained here, and 32
short conversations of the four HuatuoGPT sources written to a JSONL file in the test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_base, write_jsonl

from nanohuatuo import checkpoint, sft
from nanohuatuo.losses import IGNORE, LinearCrossEntropy, linear_cross_entropy
from nanohuatuo.data import SOURCES
from nanohuatuo.model import Transformer
from nanohuatuo.templates import HUATUO_SYSTEM, render, render_text, resolve_template
from nanohuatuo.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SYMPTOMS = ["头疼", "咳嗽", "发烧", "胃痛", "失眠", "腰疼", "皮疹", "腹泻"]
ADVICE = ["多喝水，注意休息。", "建议到医院检查。", "可以先吃点药观察。", "保持清淡饮食。"]


def conversations(n=32):
    rows = []
    for i in range(n):
        s, a = SYMPTOMS[i % len(SYMPTOMS)], ADVICE[i % len(ADVICE)]
        source = SOURCES[i % 4]
        messages = [{"role": "user", "content": f"我{s}了{i % 5 + 1}天，怎么办？"},
                    {"role": "assistant", "content": f"{s}的话，{a}"}]
        if source.endswith("conversations"):  # two turns, as in the conversation sources
            messages += [{"role": "user", "content": "需要吃药吗？"},
                         {"role": "assistant", "content": ADVICE[(i + 1) % len(ADVICE)] * (1 + i % 3)}]
        rows.append({"messages": messages, "source": source, "department": "内科", "id": f"t-{i}"})
    return rows


def sft_base(path, extra_tokens=()):
    """Tokenizer trained on the test conversations plus a random tiny model, saved in one directory."""
    texts = [HUATUO_SYSTEM, "<病人>： <HuatuoGPT>：", "system user assistant"]
    texts += [m["content"] for r in conversations() for m in r["messages"]]
    return tiny_base(path, texts, vocab_size=420, extra_tokens=extra_tokens, n_kv_heads=2, max_seq_len=512).dir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sft_base(tmp_path_factory.mktemp("sft_base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft_data") / "train.jsonl", conversations())


def config(base, data, out, **kw):
    kw = {"batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "eval_frac": 0.0, "lr": 1e-3, "device": "cpu",
          "allow_high_lr": True, "save_every": 1000, "eval_every": 1000, **kw}
    return sft.SFTConfig(model=base, data=[data], out=str(out), **kw)


def losses(out, key="loss"):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


# ----------------------------------------------------------------------------- batches and loss

@pytest.mark.parametrize("template", ["huatuo", "chatml"])
def test_labels_cover_exactly_the_assistant_tokens(tmp_path, template):
    extra = ("<|im_start|>", "<|im_end|>") if template == "chatml" else ()
    tok = Tokenizer.from_pretrained(sft_base(tmp_path, extra_tokens=extra))
    rows = conversations(6)
    examples, stats = sft.tokenize(rows, tok, template, max_len=512)
    assert stats["truncated"] == stats["dropped"] == 0
    ids, labels = sft.collate(examples, tok.pad_id)
    for b, row in enumerate(rows):
        want_ids, want_mask = render(row["messages"], tok, template)
        n = len(want_ids)
        assert ids[b, :n].tolist() == want_ids and (ids[b, n:] == tok.pad_id).all()
        trained = [t for t in range(ids.shape[1]) if labels[b, t] != IGNORE]
        assert trained == [t - 1 for t in range(1, n) if want_mask[t]]  # position t predicts token t+1
        assert all(labels[b, t] == want_ids[t + 1] for t in trained)
    if template == "chatml":  # the answer's <|im_end|> is learned, the prompt's markers are not
        im_end = tok.token_to_id("<|im_end|>")
        assert (labels == im_end).sum() == sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)


def test_truncation_and_dropping(tmp_path, base):
    tok = Tokenizer.from_pretrained(base)
    rows = conversations(4)
    _, mask0 = render(rows[0]["messages"], tok, "huatuo")
    first_answer = mask0.index(1)
    # cut right after the first answer token: it is the only label left (position 0 never is one)
    examples, stats = sft.tokenize(rows[:1], tok, "huatuo", max_len=first_answer + 1)
    assert stats == {"truncated": 1, "dropped": 0, "tokens": first_answer + 1, "targets": 1}
    examples, stats = sft.tokenize(rows[:2], tok, "huatuo", max_len=first_answer)
    assert stats["truncated"] == 2 and stats["dropped"] == 2 and examples == []


def test_heldout_split_and_source_weights(tmp_path, data):
    cfg = sft.SFTConfig(data=[data], eval_frac=0.25, source_weights={"distilled_instructions": 2,
                                                                      "real_doctor_instructions": 1})
    train, held, info = sft.load_rows(cfg)
    assert len(held) == 8 and not {r["id"] for r in held} & {r["id"] for r in train}  # split before resampling
    counts = {s: sum(r["source"] == s for r in train) for s in SOURCES}
    assert counts == {"distilled_instructions": 2 * info["read"]["distilled_instructions"],
                      "real_doctor_instructions": info["read"]["real_doctor_instructions"],
                      "distilled_conversations": 0, "real_doctor_conversations": 0}
    held_file = write_jsonl(tmp_path / "held.jsonl", conversations(3))
    train, held, _ = sft.load_rows(sft.SFTConfig(data=[data], eval_data=[held_file]))
    assert len(train) == 32 and [r["id"] for r in held] == ["t-0", "t-1", "t-2"]


def test_linear_cross_entropy_matches_autograd():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(29, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 29, (11,), generator=g)
    ours = LinearCrossEntropy.apply(h, w, t, 3)  # 4 chunks, the last one short
    (ours * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gh, h.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), ref, atol=1e-5, rtol=1e-6)


def test_step_loss_is_the_token_mean_over_the_global_batch(tmp_path, base, data):
    cfg = config(base, data, tmp_path / "run", max_steps=1, lora_r=4)
    result = sft.train(cfg)
    # by hand: the first global batch of the plan, plain logits, CE over assistant tokens, one mean
    tok = Tokenizer.from_pretrained(base)
    train_rows, _, _ = sft.load_rows(cfg)
    examples, _ = sft.tokenize(train_rows, tok, "huatuo", cfg.max_len)
    batch = sft.plan_epoch([len(e.ids) for e in examples], cfg.batch_size, cfg.seed, 0)[0]
    model = Transformer.from_pretrained(base)  # a fresh LoRA (B = 0) changes nothing before step 1
    total, count = 0.0, 0
    with torch.no_grad():
        for i in batch:
            ids, mask = examples[i].ids.long(), examples[i].mask
            logits = model(ids[None])[0]
            ce = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
            total += ce[mask[1:]].sum().item()
            count += int(mask[1:].sum())
    assert result["steps"] == 1 and losses(tmp_path / "run") == [pytest.approx(total / count, abs=1e-6)]
    assert result["train_loss"] == pytest.approx(total / count, abs=1e-6)


def test_gradient_accumulation_gives_the_same_steps(tmp_path, base, data):
    a = sft.train(config(base, data, tmp_path / "a", micro_batch_size=1, lora_r=0, max_steps=3))
    b = sft.train(config(base, data, tmp_path / "b", micro_batch_size=4, lora_r=0, max_steps=3))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_lr_schedule_and_param_groups(base):
    lrs = [sft.lr_at(s, 20, 1.0, 1) for s in range(20)]
    assert lrs[0] == 1.0 and lrs[1] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0062, abs=1e-3)
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    assert [sft.lr_at(s, 100, 1.0, 5) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    model = Transformer.from_pretrained(base)
    decay, no_decay = sft.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per block and the final norm


# ----------------------------------------------------------------------------- resume and processes

def test_resume_gives_the_same_losses(tmp_path, base, data):
    kw = dict(max_steps=6, save_every=3, lora_r=4, lora_dropout=0.1, eval_frac=0.125, eval_every=2)
    full = sft.train(config(base, data, tmp_path / "full", **kw))
    part = sft.train(config(base, data, tmp_path / "part", stop_after=3, **kw))
    assert part["stopped"] and part["steps"] == 3
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "part")] == ["step_000003"]
    (tmp_path / "part" / "checkpoints" / ".tmp-step_000004").mkdir()  # a save killed half-way is ignored
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, then killed
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    with pytest.raises(ValueError, match="pass --resume"):
        sft.train(config(base, data, tmp_path / "part", **kw))
    rest = sft.train(config(base, data, tmp_path / "part", resume=True, **kw))
    assert rest["steps"] == 6 and rest["first_eval_loss"] is None
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bit for bit
    assert rest["eval_loss"] == pytest.approx(full["eval_loss"], abs=1e-6)
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "part" / "adapter_model.safetensors").read_bytes()
    # continued further and killed before its end (--stop-after): the 6-step adapter no longer looks like its result
    more = sft.train(config(base, data, tmp_path / "part", resume=True, **{**kw, "max_steps": 8, "stop_after": 7}))
    assert more["stopped"] and not (tmp_path / "part" / "adapter_config.json").exists()
    assert sft.train(config(base, data, tmp_path / "part", resume=True, **{**kw, "max_steps": 8}))["steps"] == 8
    assert (tmp_path / "part" / "adapter_config.json").exists()


def torchrun(out, base, data, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_sft.py"), "--model", base, "--data", data, "--out", str(out), "--batch-size", "4",
           "--micro-batch-size", "2", "--max-steps", "3", "--eval-frac", "0.125", "--lr", "1e-3", "--allow-high-lr",
           "--device", "cpu", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, base, data, mode):
    # DDP: LoRA; FSDP: full fine-tuning, interrupted after step 2 and resumed (sharded optimizer state)
    lora = ["--lora-r", "4", "--lora-dropout", "0"] if mode == "ddp" else ["--lora-r", "0"]
    one = sft.train(config(base, data, tmp_path / "one", max_steps=3, eval_frac=0.125,
                           lora_r=4 if mode == "ddp" else 0, lora_dropout=0.0))  # 2 micro-batches accumulated
    if mode == "ddp":
        assert "2 process(es) DDP" in torchrun(tmp_path / "two", base, data, *lora)
    else:
        assert "2 process(es) FSDP" in torchrun(tmp_path / "two", base, data, *lora, "--fsdp", "--stop-after", "2")
        assert "resuming after step 2" in torchrun(tmp_path / "two", base, data, *lora, "--fsdp", "--resume")
    # the same sums in another order (per-process partial sums, all-reduce): float32 rounding only
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5, rel=0)
    assert losses(tmp_path / "two", "eval_loss")[-1] == pytest.approx(one["eval_loss"], abs=1e-5)
    name = "adapter_model.safetensors" if mode == "ddp" else "model.safetensors"
    ours, ref = load_file(tmp_path / "two" / name), load_file(tmp_path / "one" / name)
    assert ours.keys() == ref.keys() and all(torch.allclose(ours[k], ref[k], atol=1e-6, rtol=0) for k in ref)


def test_a_script_that_ran_a_gloo_group_ends_without_the_interpreter_shutdown(monkeypatch, capsys):
    """dist.exit_process: sys.exit's status in a plain process; after a gloo group (torchrun on CPU),
    the output flushed and os._exit with the same status, so gloo's worker threads, still alive after
    the group is destroyed, never meet a shutting-down interpreter (an abort after a finished run)."""
    from nanohuatuo import dist
    ended = []

    def fake_exit(code):
        ended.append(code)
        raise SystemExit("os._exit")
    monkeypatch.setattr(dist.os, "_exit", fake_exit)
    monkeypatch.setattr(dist, "_GLOO", False)
    with pytest.raises(SystemExit) as e:
        dist.exit_process(2)
    assert e.value.code == 2 and ended == []
    monkeypatch.setattr(dist, "_GLOO", True)
    print("done", end="")
    for code in (0, 2):
        with pytest.raises(SystemExit, match="os._exit"):
            dist.exit_process(code)
    assert ended == [0, 2] and capsys.readouterr().out == "done"


# ----------------------------------------------------------------------------- learning and outputs

def test_heldout_loss_falls(tmp_path, base, data):
    result = sft.train(config(base, data, tmp_path / "run", lora_r=0, lr=3e-3, max_steps=30, eval_frac=0.125,
                              eval_every=10))
    evals = losses(tmp_path / "run", "eval_loss")
    assert len(evals) == 4 and evals[0] == result["first_eval_loss"] and evals[-1] == result["eval_loss"]
    assert result["eval_loss"] < 0.7 * result["first_eval_loss"]  # 6.04 -> 3.79 here
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_cli_lora_writes_a_peft_adapter_and_merged_model(tmp_path, base, data):
    out = tmp_path / "lora"
    assert sft.main(["--model", base, "--data", data, "--out", str(out), "--lora-r", "4", "--max-steps", "2",
                     "--batch-size", "4", "--eval-frac", "0.125", "--save-merged", "--lr", "2e-4", "--device", "cpu"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                       "up_proj", "v_proj"]
    tuned = Transformer.from_pretrained(base, adapter=out)
    merged = Transformer.from_pretrained(out / "merged")
    tok = Tokenizer.from_pretrained(base)
    ids = torch.tensor([[1, 5, 9, 30, 60, 7]])
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids), merged(ids), atol=1e-5, rtol=0)
        assert not torch.allclose(tuned(ids), Transformer.from_pretrained(base)(ids))
    assert Tokenizer.from_pretrained(out / "merged").vocab_size == Tokenizer.from_pretrained(base).vocab_size
    assert (out / "loss.png").exists() and (out / "checkpoints" / "step_000002" / "adapter").is_dir()
    # the trained format travels with the adapter and the merged model (their tokenizer files hold it)
    conv = conversations(1)[0]["messages"]
    for d in (out, out / "merged"):
        carried = resolve_template(d, "auto")
        assert carried.is_jinja and render_text(conv, tok, carried) == render_text(conv, tok, "huatuo")


def test_full_fine_tuning_writes_a_model_dir(tmp_path, base, data):
    out = tmp_path / "full"
    sft.train(config(base, data, out, lora_r=0, max_steps=2, lr=1e-3))
    model = Transformer.from_pretrained(out)
    assert Tokenizer.from_pretrained(out).vocab_size == model.config.vocab_size
    before = Transformer.from_pretrained(base)
    for name, p in before.named_parameters():  # every weight trained, norms included
        assert not torch.equal(p, model.get_parameter(name)), name


def test_errors_speak_to_the_user(tmp_path, base, data):
    with pytest.raises(ValueError, match="above 0.0002.*--allow-high-lr"):
        sft.train(config(base, data, tmp_path / "a", lr=5e-4, allow_high_lr=False))
    with pytest.raises(ValueError, match="--batch-size 6 is not a multiple of --micro-batch-size 4"):
        sft.train(config(base, data, tmp_path / "b", batch_size=6, micro_batch_size=4))
    with pytest.raises(ValueError, match="less than one global batch"):
        sft.train(config(base, data, tmp_path / "c", batch_size=64, micro_batch_size=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}], "source": "x"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:1: conversation must end with an assistant message"):
        sft.train(config(base, str(bad), tmp_path / "d"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_lora_full_and_checkpointing(tmp_path, base, data):
    cpu = sft.train(config(base, data, tmp_path / "cpu", max_steps=3, lora_r=4, lora_dropout=0.0, device="cpu"))
    kw = dict(max_steps=3, lora_r=4, lora_dropout=0.0, device="auto")  # auto: cuda, bf16 autocast
    gpu = sft.train(config(base, data, tmp_path / "gpu", **kw))
    sft.train(config(base, data, tmp_path / "ckpt", grad_checkpointing=True, **kw))
    assert losses(tmp_path / "gpu") == pytest.approx(losses(tmp_path / "cpu"), abs=2e-2)  # bf16 matmuls
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "gpu"), abs=1e-3)
    assert cpu["train_loss"] == pytest.approx(gpu["train_loss"], abs=2e-2)
    Transformer.from_pretrained(base, adapter=tmp_path / "gpu")
    full = sft.train(config(base, data, tmp_path / "full", max_steps=3, lora_r=0, device="cuda"))
    assert torch.isfinite(torch.tensor(full["train_loss"]))
    assert Transformer.from_pretrained(tmp_path / "full").embed_tokens.weight.dtype == torch.float32
    # the fused loss under autocast against plain cross-entropy of bf16 logits
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 64, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(5000, 64, device="cuda", generator=g, requires_grad=True)
    t = torch.randint(0, 5000, (300,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = LinearCrossEntropy.apply(h, w, t, 64)
        ref = F.cross_entropy((h @ w.t()).float(), t, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-2)
    gh, gw = torch.autograd.grad(ours, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2)


def test_a_second_run_on_the_same_out_refuses(tmp_path, base, data):
    from nanohuatuo.cli import prepare_out
    with prepare_out(tmp_path / "run"):  # another run holds --out (train_sft.py started twice)
        with pytest.raises(ValueError, match="in use by another run"):
            sft.train(config(base, data, tmp_path / "run", resume=True))
    run = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--model", base, "--data", data, "--out",
                          str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4", "--device", "cpu",
                          "--lora-r", "0"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]  # the lock went with the first run


@pytest.mark.parametrize("damage", ["config key", "tensor", "truncated", "no directory"])
def test_bad_model_directories_are_one_line_and_exit_2(tmp_path, base, data, damage, capsys):
    import shutil
    from safetensors.torch import save_file
    bad = tmp_path / "model"
    shutil.copytree(base, bad)
    weights = bad / "model.safetensors"
    if damage == "config key":
        cfg = json.loads((bad / "config.json").read_text())
        del cfg["hidden_size"]
        (bad / "config.json").write_text(json.dumps(cfg))
    elif damage == "tensor":
        tensors = load_file(weights)
        del tensors[sorted(tensors)[-1]]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        bad = tmp_path / "nowhere"
    code = sft.main(["--model", str(bad), "--data", data, "--out", str(tmp_path / "out"), "--max-steps", "1",
                     "--batch-size", "4", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err
    assert not (tmp_path / "out").exists()  # checked before --out is made
