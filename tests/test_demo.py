"""The demo in its reduced size: every stage runs and every artefact exists and is valid."""

import json
import os

import torch

from nanohuatuo import Transformer
from nanohuatuo.demo import run
from nanohuatuo.reward import load_reward_model, score_texts


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_artefacts(tmp_path):
    out = str(tmp_path / "demo")
    summary = run(out, quick=True)
    report = open(os.path.join(out, "report.md")).read()
    for needle in ("held-out loss", "pairwise accuracy", "mean RM score", "EOS rate", "助手>"):
        assert needle in report
    for png in ("sft/loss.png", "rm/metrics.png", "ppo/curves.png", "ppo/ppo_stats.png"):
        assert _png(os.path.join(out, png)), png
        assert f"({png})" in report  # the report shows it
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
    assert summary["seconds"] < 120


def test_quick_demo_with_an_openai_compatible_judge(tmp_path):
    from test_feedback import ScriptedServer  # the scripted local /v1/chat/completions server
    server = ScriptedServer(lambda body, count: (200, {}, "理由：第二个回答更贴近医生的回复。\n排名：2 > 1"))
    try:
        summary = run(str(tmp_path / "demo"), quick=True, judge_base_url=server.base_url, judge_model="judge",
                      judge_api_key="EMPTY")
    finally:
        server.close()
    assert len(server.requests) == summary["size"]["rl_prompts"]  # one ranking request per sampled prompt
    assert summary["judge"] == "OpenAI-compatible judge judge"
    assert "OpenAI-compatible judge" in open(tmp_path / "demo" / "report.md").read()
