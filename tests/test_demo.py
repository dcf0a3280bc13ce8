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
    summary = run(out=out, quick=True)
    assert list(summary["stage_seconds"]) == list(BUDGET)  # every stage ran, in order
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for needle in ("held-out loss", "pairwise accuracy", "Mean reward-model score", "win / tie / loss",
                   "single-turn questions", "multi-turn consultations", "bleu-1", "rouge-l", "distinct-2",
                   "## Time", "| **total** |", summary["machine"]["cpu"], f"torch {torch.__version__}"):
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
