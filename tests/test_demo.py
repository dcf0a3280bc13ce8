"""The demo in its reduced size: every stage runs, the report holds the evaluation and the time per stage."""

import json
import os

import torch

from nanohuatuo import Transformer
from nanohuatuo.demo import BUDGET, main, run
from nanohuatuo.reward_model import load_reward_model, score_texts


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_runs_every_stage_and_reports_them(tmp_path):
    out = str(tmp_path / "demo")
    summary = run(out=out, quick=True, profile=True)
    assert list(summary["stage_seconds"]) == list(BUDGET)  # every stage ran, in order
    for stage in BUDGET:  # --profile: one listing per stage, the hottest functions in the report
        assert os.path.getsize(os.path.join(out, "profile", f"{stage}.txt")) > 0
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for needle in ("held-out loss", "pairwise accuracy", "Mean reward-model score", "win / tie / loss",
                   "single-turn questions", "multi-turn consultations", "bleu-1", "rouge-l", "distinct-2",
                   "## Time", "| **total** |", "Where the time goes", summary["machine"]["cpu"], f"torch {torch.__version__}"):
        assert needle in report, needle
    for stage in BUDGET:
        assert f"| {stage} | " in report  # the timing table has a row per stage
    for png in ("sft/loss.png", "rm/metrics.png", "ppo/curves.png", "ppo/ppo_stats.png", "eval/pairwise/winrate.png",
                "eval/dialogue/winrate.png"):
        assert _png(os.path.join(out, png)), png
        assert f"({png})" in report  # the report shows it
    assert "\ufffd" not in report  # incomplete byte sequences are never shown
    # checkpoints load with the public API
    ids = torch.tensor([[1, 5, 9, 13]])
    for d in ("base", "sft"):
        assert torch.isfinite(Transformer.from_pretrained(os.path.join(out, d))(ids)).all()
    policy = Transformer.from_pretrained(os.path.join(out, "sft"), adapter=os.path.join(out, "ppo"))
    assert torch.isfinite(policy(ids)).all()
    rm = load_reward_model(os.path.join(out, "rm"))
    assert torch.isfinite(score_texts(rm, ["头痛怎么办？"], ["多休息。"])).all()
    # the numbers the report is made of
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["sft"]["eval_loss"] < s["sft"]["first_eval_loss"]
    assert 0.0 <= s["rm"]["eval_accuracy"] <= 1.0
    assert s["ppo"]["first_score"] is not None and s["ppo"]["last_kl"] is not None
    pw, dl = s["eval"]["pairwise"], s["eval"]["dialogue"]
    assert pw["win"] + pw["tie"] + pw["loss"] + pw["unjudged"] == pw["n"] + pw["unjudged"] == s["size"]["eval_questions"]
    assert dl["win"] + dl["tie"] + dl["loss"] + dl["unjudged"] == s["size"]["eval_cases"]
    # both orders were judged for every pair
    rows = [json.loads(line) for line in open(os.path.join(out, "eval", "pairwise", "judgements.jsonl"))]
    assert len(rows) == 2 * s["size"]["eval_questions"]


def test_demo_refuses_a_foreign_out_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--out", str(tmp_path), "--quick"]) == 2
    assert "holds something other than an earlier demo run" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").exists()


def test_quick_demo_with_one_llm_as_teacher_judge_and_patient(tmp_path):
    """--llm-base-url: distill.py makes data, the judge ranks, evaluate.py judges and plays the patient, all
    against one scripted OpenAI-compatible endpoint; each kind of request gets a well-formed reply."""
    import random

    from fake_openai import ScriptedServer
    from nanohuatuo import distill, evaluate, feedback

    def handler(request, path):
        first = request["messages"][0]["content"]
        if first.startswith(distill.INSTRUCTION_PROMPT[:20]):  # self-instruct: fresh numbered questions
            rng = random.Random(request.get("seed", 0))
            return "\n".join(f"{i + 1}. " + "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(12)) + "？"
                             for i in range(3))
        if first == distill.ANSWER_SYSTEM:
            return "建议多休息，多喝水，症状加重请及时就医。"
        if first.startswith(distill.PATIENT_SYSTEM[:20]):
            doctor_turns = sum(m["role"] == "user" for m in request["messages"]) - 1
            return "医生您好，我最近总是头痛。" if doctor_turns == 0 else "明白了，谢谢医生。" + distill.END_MARK
        if first.startswith(distill.DOCTOR_SYSTEM[:12]):
            return "考虑紧张型头痛，建议注意休息，必要时复诊。" + distill.END_MARK
        if first.startswith(distill.POLISH_PROMPT[:20]):
            return "医生：" + request["messages"][0]["content"].split("\n")[-1]
        if first == feedback.SYSTEM_PROMPT:
            n = request["messages"][-1]["content"].count("【候选回答")
            return "理由：略。\n排名：" + " > ".join(str(i) for i in range(n, 0, -1))
        if first == evaluate.JUDGE_SYSTEM:
            return "Both are short.\nAssistant 1 is better than Assistant 2"
        if first.startswith(evaluate.PATIENT_SYSTEM[:20]):
            return "我头痛三天了，晚上睡不好。"
        raise AssertionError(f"unexpected request: {first[:60]!r}")

    out = tmp_path / "demo"
    with ScriptedServer(handler) as srv:
        summary = run(out=str(out), quick=True, llm_base_url=srv.base_url, llm_model="teacher", llm_api_key="k")
        sent = [body["messages"][0]["content"] for _, body in srv.requests]
    assert summary["online"] and summary["judge"] == "OpenAI-compatible judge teacher"
    for prefix in (distill.INSTRUCTION_PROMPT[:20], distill.PATIENT_SYSTEM[:20], distill.POLISH_PROMPT[:20],
                   feedback.SYSTEM_PROMPT, evaluate.JUDGE_SYSTEM, evaluate.PATIENT_SYSTEM[:20]):
        assert any(s.startswith(prefix) for s in sent), prefix  # every role was played by the endpoint
    for name in ("instructions", "conversations", "polished"):
        assert (out / "distilled" / f"{name}.jsonl").stat().st_size > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "with an LLM as teacher, judge and patient" in report
    # the judge always prefers the answer shown first, so with the order swap every pair is a tie
    assert summary["eval"]["pairwise"]["tie"] == summary["size"]["eval_questions"]
