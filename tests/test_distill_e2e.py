"""End to end: the three distill commands against serve.py on a tiny model, the four sources mixed
by `python data.py mix`, and a few SFT steps on the mix.

The tiny model is random, so its replies are noise; to make them parseable, whole numbered question
lines are single (ordinary, decoded) tokens of its vocabulary and its output layer favours them and,
less, the end token: every reply is a few such lines, ended (a reply cut at max_tokens is
unusable). That is enough to drive each command through the real server, template, client, cache
and filters, and to hand train_sft.py rows of all four sources."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_base, write_jsonl
import nanohuatuo.distill as D
from nanohuatuo.data import SOURCES, load_conversations, read_jsonl

serve = pytest.importorskip("nanohuatuo.serve", reason="distill's end-to-end test needs serve.py")
sft = pytest.importorskip("nanohuatuo.sft", reason="distill's end-to-end test needs the SFT stage")

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["孩子发烧三天了还在反复，需要去医院吗", "高血压患者可以喝咖啡吗", "湿疹反复发作平时要注意什么",
             "胃镜检查前需要空腹多久", "膝盖疼上下楼梯更明显是怎么回事", "孕妇感冒了能吃什么药", "长期失眠应该挂哪个科",
             "智齿发炎要不要马上拔", "血糖偏高还能吃水果吗", "老人摔倒后头晕要做什么检查"]
LINES = tuple(f"\n{i}. {q}？\n" for i, q in enumerate(QUESTIONS, 1))
CASE = {"id": 1, "medical_case": "病情描述：\n手上起小水疱，很痒，一周了。", "doctor_diagnosis": "手部湿疹",
        "Department": "皮肤科"}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def line_model(d) -> str:
    """A tiny Llama whose replies are mostly whole lines of LINES (see the module doc)."""
    texts = [D.INSTRUCTION_PROMPT, D.ANSWER_SYSTEM, D.PATIENT_SYSTEM, D.DOCTOR_SYSTEM, D.POLISH_PROMPT, *QUESTIONS]
    base = tiny_base(d, texts, vocab_size=600, extra_tokens=LINES, max_seq_len=4096)
    ids = [base.tok.encode(line)[0] for line in LINES]
    assert len(ids) == len(LINES)
    with torch.no_grad():
        w = base.model.lm_head.weight
        w.zero_()
        # the lines and, weaker, the end token: a reply ends after some lines (one cut at max_tokens is unusable)
        rows = ids + [base.tok.eos_id]
        w[rows] = torch.randn(len(rows), w.shape[1], generator=torch.Generator().manual_seed(0)) * 5
        w[base.tok.eos_id] *= 0.4
    base.model.save_pretrained(d)
    config = Path(d) / "tokenizer_config.json"
    tok = json.loads(config.read_text(encoding="utf-8"))
    for entry in tok["added_tokens_decoder"].values():
        if entry["content"] in LINES:
            entry["special"] = False  # decoded as text, not skipped like </s>
    config.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return str(d)


@pytest.mark.slow
def test_three_commands_on_serve_then_mix_and_sft(tmp_path, capsys):
    model = line_model(tmp_path / "tiny")
    real = read_jsonl(ROOT / "data" / "sft_real_doctor_instructions.jsonl")[:2]
    real += read_jsonl(ROOT / "data" / "sft_real_doctor_conversations.jsonl")[:1]
    real_path = write_jsonl(tmp_path / "real.jsonl", real)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([CASE], ensure_ascii=False), encoding="utf-8")
    out = {name: str(tmp_path / f"{name}.jsonl") for name in ("di", "dc", "rd", "mix")}

    cfg = serve.ServeConfig(model=model, port=0, template="huatuo", served_model_name="tiny", batch_size=4, device="cpu",
                            log_requests=False)
    with serve.make_server(cfg).start() as srv:
        common = ["--teacher-base-url", srv.url + "/v1", "--teacher-model-name", "tiny", "--max-new-tokens", "12", "--concurrency", "4"]
        assert D.main(["instructions", "--limit", "4", "--out", out["di"]] + common) == 0
        assert D.main(["conversations", "--data", real_path, str(cases), "--limit", "2", "--max-turns", "2",
                       "--out", out["dc"]] + common) == 0
        assert D.main(["polish", "--data", real_path, "--out", out["rd"]] + common) == 0
    printed = capsys.readouterr().out
    assert "instructions: kept 4" in printed and "conversations: kept 2" in printed and "polish: kept 3" in printed

    di, dc, rd = (load_conversations(out[k]) for k in ("di", "dc", "rd"))
    assert len(di) == 4 and {r["messages"][0]["content"].rstrip("？") for r in di} <= set(QUESTIONS)
    assert len(dc) == 2 and all(r["stop"] == "max_turns" and len(r["messages"]) == 4 for r in dc)
    assert [r["source"] for r in rd] == ["real_doctor_instructions"] * 2 + ["real_doctor_conversations"]
    assert all(m["original"] for r in rd for m in r["messages"] if m["role"] == "assistant")
    # a model that writes questions loses the drug names: those turns fall back to the doctor's reply
    assert all(any("flag" in m for m in r["messages"]) for r in (rd[0], rd[2]))
    assert all(m["content"] == m["original"] for r in rd for m in r["messages"] if "flag" in m)
    assert not any(r.get("flagged") for r in rd)  # so mix keeps every row

    weights = ",".join(f"{s}=1" for s in SOURCES)
    from nanohuatuo.prepare import main as data_main
    assert data_main(["mix", "--data", out["di"], out["dc"], out["rd"], "--weights", weights, "--out", out["mix"]]) == 0
    mixed = load_conversations(out["mix"])
    assert len(mixed) == 9 and {r["source"] for r in mixed} == set(SOURCES)

    run = tmp_path / "sft"
    assert sft.main(["--model", model, "--data", out["mix"], "--out", str(run), "--max-steps", "2", "--batch-size",
                     "4", "--micro-batch-size", "2", "--max-len", "1024", "--template", "huatuo", "--lora-r", "4",
                     "--eval-frac", "0", "--device", "cpu", "--lr", "1e-4"]) == 0
    steps = [row for row in read_jsonl(run / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2] and all(math.isfinite(row["loss"]) for row in steps)
    assert (run / "adapter_config.json").exists()
