"""DPO: the losses by hand, answer log-probs against a full log-softmax, the three preference file
shapes, pairs, learning a synthetic preference, exact resume, and bad input."""

import json
import math
import random

import pytest
import torch

from conftest import tiny_base, write_jsonl
from nanohuatuo import dpo, preferences
from nanohuatuo.data import DataError
from nanohuatuo.losses import dpo_loss, sequence_logprobs
from nanohuatuo.templates import render

FILL = ["多喝水", "注意休息", "清淡饮食", "按时吃药", "测量体温", "保持睡眠", "适当运动", "观察症状"]
MARK = "及时就医"  # the synthetic preference: more of these is better
QUESTIONS = ["头疼三天怎么办", "孩子发烧咳嗽", "胃痛吃什么药", "血压偏高要注意什么", "失眠多梦怎么调理"]


def records(n, seed=0):
    """Records with 3 answers holding 2, 1 and 0 markers: best first."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answers = []
        for marks in (2, 1, 0):
            words = [rng.choice(FILL) for _ in range(3 - marks)] + [MARK] * marks
            rng.shuffle(words)
            answers.append("，".join(words) + "。")
        rows.append({"id": f"p{i}", "prompt": rng.choice(QUESTIONS), "answers": answers})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    texts = FILL + [MARK] + QUESTIONS + [f"User: {q}" for q in QUESTIONS] + ["Assistant:"]
    return tiny_base(tmp_path_factory.mktemp("base"), texts)


# ----------------------------------------------------------------------------- losses by hand

def test_dpo_losses_by_hand():
    # policy moved +1 nat on the chosen answer and -1 on the rejected one: margin h = 2
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([-5.0])
    nls = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -logsigmoid(x)
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(nls(1.0))  # -logsigmoid(0.5 * 2)
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-0.5)
    loss = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)[0]  # conservative DPO
    assert loss.item() == pytest.approx(0.8 * nls(1.0) + 0.2 * nls(-1.0))
    loss = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0]
    assert loss.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)  # (h - 1/(2 tau))^2 = 1
    assert dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)  # relu(1 - .5)
    assert dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge")[0].item() == 0.0
    # at the reference the DPO loss is log 2 whatever beta
    assert dpo_loss(rc, rr, rc, rr, beta=3.0)[0].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="use sigmoid, ipo or hinge"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_sequence_logprobs_sum_the_answer_tokens_only(base):
    _, _, model = base
    torch.manual_seed(0)
    ids = torch.randint(4, 300, (2, 9))
    ids[1, 7:] = 0  # right padding on the second row
    starts, lengths = torch.tensor([5, 3]), torch.tensor([9, 7])
    with torch.no_grad():
        got, n = sequence_logprobs(model, ids, starts, lengths)
        logp = model.logits(model.hidden_states(ids)).float().log_softmax(-1)
    want = [sum(logp[b, t - 1, ids[b, t]].item() for t in range(int(starts[b]), int(lengths[b]))) for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=0)
    assert n.tolist() == [4, 4]


# ----------------------------------------------------------------------------- preference files

def test_the_three_preference_shapes_read_alike(base, tmp_path):
    _, tok, _ = base
    ours = {"id": "a", "prompt": "孩子发烧咳嗽", "answers": ["多喝水。", "按时吃药。", "观察症状。"], "reference_index": 1}
    trl = {"prompt": "孩子发烧咳嗽", "chosen": "多喝水。", "rejected": "观察症状。"}
    trl_chat = {"prompt": [{"role": "user", "content": "孩子发烧咳嗽"}],
                "chosen": [{"role": "assistant", "content": "多喝水。"}],
                "rejected": [{"role": "assistant", "content": "观察症状。"}]}
    trl_implicit = {"chosen": [{"role": "user", "content": "孩子发烧咳嗽"}, {"role": "assistant", "content": "多喝水。"}],
                    "rejected": [{"role": "user", "content": "孩子发烧咳嗽"},
                                 {"role": "assistant", "content": "观察症状。"}]}
    medicalgpt = {"system": "你是医生", "history": [["头疼三天怎么办", "注意休息。"]], "question": "孩子发烧咳嗽",
                  "response_chosen": "多喝水。", "response_rejected": "观察症状。"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [ours, trl, trl_chat, trl_implicit, medicalgpt])
    recs = preferences.read_records(path)
    assert recs[0] == {"id": "a", "prompt": [{"role": "user", "content": "孩子发烧咳嗽"}],
                       "answers": ["多喝水。", "按时吃药。", "观察症状。"], "reference_index": 1}
    user = [{"role": "user", "content": "孩子发烧咳嗽"}]
    for r in recs[1:4]:
        assert (r["prompt"], r["answers"], r["reference_index"]) == (user, ["多喝水。", "观察症状。"], None)
    assert recs[4]["prompt"] == [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "头疼三天怎么办"},
                                 {"role": "assistant", "content": "注意休息。"}] + user
    assert recs[1]["id"].endswith("mixed.jsonl:2")
    # rendered: the answer's tokens are the last assistant turn only, not the history's answer
    ex = preferences.read_preferences(path, tok, "plain")
    assert ex[1]["seqs"] == ex[2]["seqs"] == ex[3]["seqs"] == [ex[0]["seqs"][0], ex[0]["seqs"][2]]
    ids, mask = render(preferences.with_answer(recs[4]["prompt"], "多喝水。"), tok, "plain")
    start = ex[4]["answer_starts"][0]
    assert ids == ex[4]["seqs"][0] and 0 < start and all(mask[start:]) and not mask[start - 1]
    assert sum(mask[:start]) > 0  # the history's answer was learned by render, but is not the answer here
    assert tok.decode(ids[start:]).strip().startswith("多喝水")


@pytest.mark.parametrize("row,match", [
    ({"prompt": "x", "answers": ["only one"]}, "at least 2 answers"),
    ({"prompt": "x", "chosen": "a", "rejected": 3}, "'rejected' must be a string or a messages list"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share every turn"),
    ({"question": "q", "history": [["only a question"]], "response_chosen": "a", "response_rejected": "b"},
     "MedicalGPT row"),
    ({"question": "q", "answer": "a"}, "not a preference row"),
])
def test_a_row_of_the_wrong_shape_names_its_file_and_line(tmp_path, row, match):
    good = {"prompt": "x", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"prefs.jsonl:2: .*{match}"):
        preferences.read_records(path)


def test_pairs_and_cutting():
    examples = [{"seqs": [[1], [2], [3]]}, {"seqs": [[4], [5]]}]
    assert dpo.make_pairs(examples, "all") == [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 1)]
    assert dpo.make_pairs(examples, "best-worst") == [(0, 0, 2), (1, 0, 1)]
    seq = list(range(10))  # prompt 0..5, answer 6..9
    assert dpo.fit(seq, 6, 20) == (seq, 6)
    assert dpo.fit(seq, 6, 6) == ([4, 5, 6, 7, 8, 9], 2)  # prompt cut from the left
    assert dpo.fit(seq, 6, 3) == ([5, 6, 7], 1)  # one prompt token kept; the answer loses its end
    batches = dpo.plan(5, 2, 1, 7, seed=0)
    assert len(batches) == 7 and sorted(sum(batches[:3], [])) == list(range(5))


# ----------------------------------------------------------------------------- training and resume

def _cfg(path, data, out, **kw):
    kw = {**dict(template="plain", lora_r=4, lr=5e-3, beta=0.5, batch_size=4, micro_batch_size=2, eval_frac=0.2,
                 eval_every=100, save_every=100, seed=0, device="cpu", warmup_frac=0.0), **kw}
    return dpo.DPOConfig(model=path, data=[data], out=str(out), **kw)


def test_learns_the_synthetic_preference(base, tmp_path):
    path, _, _ = base
    data = write_jsonl(tmp_path / "prefs.jsonl", records(40))
    res = dpo.train(_cfg(path, data, tmp_path / "out", pairs="best-worst", max_steps=16))
    assert res["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the policy is the reference
    assert res["last_loss"] < 0.3 and res["eval_accuracy"] == 1.0 and res["eval_margin"] > 0
    assert res["steps"] == 16 and not res["stopped"]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and (tmp_path / "out" / "metrics.png").exists()


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(base, tmp_path, loss):
    path, _, _ = base
    data = write_jsonl(tmp_path / "prefs.jsonl", records(12))
    kw = dict(loss=loss, max_steps=6, lora_dropout=0.1, eval_every=2)
    full = dpo.train(_cfg(path, data, tmp_path / "full", **kw))
    part = dpo.train(_cfg(path, data, tmp_path / "part", stop_after=3, **kw))
    assert part["stopped"] and not (tmp_path / "part" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="pass --resume"):
        dpo.train(_cfg(path, data, tmp_path / "part", **kw))
    rest = dpo.train(_cfg(path, data, tmp_path / "part", resume=True, **kw))
    assert (tmp_path / "part" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rs]  # noqa: E731
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    want = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert strip(rows) == strip(want)
    assert rest["last_loss"] == full["last_loss"] and rest["eval_loss"] == full["eval_loss"]


def test_bad_input_is_one_line_and_exit_2(base, tmp_path, capsys):
    path, _, _ = base
    argv = ["--model", path, "--out", str(tmp_path / "out"), "--template", "plain", "--device", "cpu"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "a"}])
    assert dpo.main(argv + ["--data", bad]) == 2
    assert dpo.main(argv + ["--data", str(tmp_path / "typo.jsonl")]) == 2
    assert dpo.main(argv + ["--data", bad, "--label-smoothing", "0.1", "--loss", "ipo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "bad.jsonl:1" in err[0] and "typo.jsonl" in err[1] and "label-smoothing" in err[2]
    assert not (tmp_path / "out").exists()  # nothing was touched


def test_the_adapter_written_for_the_base_is_sft_plus_dpo(base, tmp_path):
    from nanohuatuo.lora import apply_lora, lora_modules, save_adapter
    from nanohuatuo.model import Transformer
    path, tok, _ = base
    sft = Transformer.from_pretrained(path)
    apply_lora(sft, r=2, alpha=4, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(sft):
            m.lora_B.weight.normal_(0, 0.1)  # a non-trivial SFT adapter
    save_adapter(sft, tmp_path / "sft")
    data = write_jsonl(tmp_path / "prefs.jsonl", records(8))
    res = dpo.train(_cfg(path, data, tmp_path / "out", adapter=str(tmp_path / "sft"), max_steps=2, save_merged=True))
    ids = torch.tensor([render(preferences.with_answer("孩子发烧咳嗽", "多喝水。"), tok, "plain")[0]])
    with torch.no_grad():
        model = Transformer.from_pretrained(path, adapter=res["out"])
        merged = Transformer.from_pretrained(tmp_path / "out" / "merged")
        sft_only = Transformer.from_pretrained(path, adapter=str(tmp_path / "sft"))
        got, want = model.logits(model.hidden_states(ids)), merged.logits(merged.hidden_states(ids))
        before = sft_only.logits(sft_only.hidden_states(ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - before).abs().max() > 1e-4  # DPO moved it away from the SFT model
