"""The demo in its reduced size: every stage runs, the report holds the evaluation and the time per stage."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanohuatuo import Transformer, demo
from nanohuatuo.cli import UserError
from nanohuatuo.demo import BUDGET, DemoConfig, choose_size, main, run
from nanohuatuo.reward_model import load_reward_model, score_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_runs_every_stage_and_reports_them(tmp_path):
    out = str(tmp_path / "demo")
    summary = run(out=out, quick=True, profile=True, algo="all")
    assert list(summary["stage_seconds"]) == list(BUDGET)  # every stage ran, in order, the three RL steps too
    assert summary["algos"] == ["PPO", "DPO", "GRPO"]
    for stage in BUDGET:  # --profile: one listing per stage, the hottest functions in the report
        assert os.path.getsize(os.path.join(out, "profile", f"{stage}.txt")) > 0
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for needle in ("held-out loss", "pairwise accuracy", "Mean reward-model score", "win / tie / loss",
                   "single-turn questions", "multi-turn consultations", "bleu-1", "rouge-l", "distinct-2",
                   "## Time", "| **total** |", "Where the time goes", summary["machine"]["cpu"], f"torch {torch.__version__}"):
        assert needle in report, needle
    for stage in BUDGET:
        assert f"| {stage} | " in report  # the timing table has a row per stage
    # the three against SFT in one table: win/tie/loss, LC, answer length, held-out RM score, wall time
    table = report[report.index("### Side by side"):]
    for algo in ("PPO", "DPO", "GRPO"):
        w = summary["eval"]["by_algo"][algo]["pairwise"]
        assert f"| {algo} | {w['win']} / {w['tie']} / {w['loss']} |" in table
        assert summary[algo.lower()]["stage_seconds"] == summary["stage_seconds"][algo.lower()]
        assert f"{algo}_vs_SFT" in summary["eval"]["rm_heldout"]
    for png in ("sft/loss.png", "rm/metrics.png", "ppo/curves.png", "ppo/ppo_stats.png", "dpo/metrics.png",
                "grpo/curves.png", "eval/pairwise/winrate.png", "eval/dialogue/winrate.png"):
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
    def bare(name):
        raise AssertionError(f"summary.json holds a bare {name}: not strict JSON")
    s = json.load(open(os.path.join(out, "summary.json")), parse_constant=bare)
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
    from nanohuatuo import consult, distill, evaluate, feedback

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
        if first.startswith(consult.PATIENT_SYSTEM[:20]):
            return "我头痛三天了，晚上睡不好。"
        raise AssertionError(f"unexpected request: {first[:60]!r}")

    out = tmp_path / "demo"
    with ScriptedServer(handler) as srv:
        summary = run(out=str(out), quick=True, llm_base_url=srv.base_url, llm_model_name="teacher", llm_api_key="k")
        sent = [body["messages"][0]["content"] for _, body in srv.requests]
    assert summary["online"] and summary["judge"] == "OpenAI-compatible judge teacher"
    for prefix in (distill.INSTRUCTION_PROMPT[:20], distill.PATIENT_SYSTEM[:20], distill.POLISH_PROMPT[:20],
                   feedback.SYSTEM_PROMPT, evaluate.JUDGE_SYSTEM, consult.PATIENT_SYSTEM[:20]):
        assert any(s.startswith(prefix) for s in sent), prefix  # every role was played by the endpoint
    for name in ("instructions", "conversations", "polished"):
        assert (out / "distilled" / f"{name}.jsonl").stat().st_size > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "with an LLM as teacher, judge and patient" in report and "A real judge, teacher and patient" not in report
    # the judge always prefers the answer shown first, so with the order swap every pair is a tie
    assert summary["eval"]["pairwise"]["tie"] == summary["size"]["eval_questions"]
    # the replies are kept beside --out, which a rerun replaces: the same distillation is not paid for again
    assert (tmp_path / "demo.llm_cache" / "judge.sqlite").exists()
    distilling = (distill.INSTRUCTION_PROMPT[:20], distill.PATIENT_SYSTEM[:20], distill.POLISH_PROMPT[:20])
    with ScriptedServer(handler) as srv:
        run(out=str(out), quick=True, llm_base_url=srv.base_url, llm_model_name="teacher", llm_api_key="k")
        again = [body["messages"][0]["content"] for _, body in srv.requests]
    assert not [s for s in again if s.startswith(distilling)]


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def real_checkpoint(path):
    """A tiny Qwen2 checkpoint as transformers saves it (random weights), with a byte-level BPE tokenizer
    trained on the bundled data and a ChatML template in tokenizer_config.json, as Qwen publishes it."""
    import transformers as tf
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from nanohuatuo.demo import load_bundled
    rows, _ = load_bundled()
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([m["content"] for r in rows for m in r["messages"]], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tk.token_to_id("<|im_end|>"))
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def test_quick_demo_on_a_real_checkpoint_is_lora_with_its_own_template(tmp_path, capsys, monkeypatch):
    model, n_params = real_checkpoint(tmp_path / "qwen")
    out = tmp_path / "demo"
    # as on a CPU with bfloat16 instructions, whatever this one has: the real-model path then trains in bf16
    monkeypatch.setattr(demo, "native_bf16", lambda: True)
    summary = run(out=str(out), quick=True, model=model)
    assert summary["params"] == n_params  # counted from the safetensors headers, nothing loaded
    said = capsys.readouterr().out
    # the profile follows the device; --quick shrank the counts, not the recipe
    assert summary["size_profile"] == "cpu" and "size profile: cpu (" in said and "with --quick" in said
    assert "dtype bfloat16 (auto: this CPU has bfloat16 instructions" in said
    size = summary["size"]
    assert size["lora_r"] == 16 and size["sft_lr"] <= 2e-4 and size["rm_lr"] <= 3e-4 and size["ppo_lr"] <= 5e-5
    assert size["sft_steps"] == 8 and size["ppo_steps"] == 3
    for d in ("sft", "ppo"):  # adapters on the real base, never full weights
        assert (out / d / "adapter_model.safetensors").exists() and not (out / d / "model.safetensors").exists()
        assert CHATML in (out / d / "chat_template.jinja").read_text()  # template auto: the model's own
    assert summary["sft"]["eval_loss"] < summary["sft"]["first_eval_loss"]
    ppo_cfg = json.loads((out / "ppo" / "ppo_config.json").read_text())
    assert ppo_cfg["lam"] == 1.0 and ppo_cfg["reward"] == str(out / "rm") and ppo_cfg["dtype"] == "bfloat16"
    # evaluated against the base model too, with its answers in the report
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "PPO vs the base model" in report and "\n- base: " in report and "\n- SFT: " in report
    assert summary["eval"]["pairwise_base"]["n"] + summary["eval"]["pairwise_base"]["unjudged"] == 6
    assert "\ufffd" not in report
    # the reward model's scores of base, SFT and PPO on prompts PPO never saw: 4 doctor prompts + 6 questions
    h = summary["eval"]["rm_heldout"]
    assert h["n"] == 10 and set(h["mean"]) == {"PPO", "SFT", "base"}
    p = h["PPO_vs_SFT"]
    assert p["higher"] + p["lower"] <= 10 and abs(p["diff"] - (h["mean"]["PPO"] - h["mean"]["SFT"])) < 1e-9
    assert "prompts RL never saw" in report
    # and their sampled answers (k = 4 at PPO's temperature), PPO against SFT
    sm = h["sampled"]
    assert sm["k"] == 4 and set(sm["mean"]) == {"PPO", "SFT"} and sm["PPO_vs_SFT"]["n"] == 10
    assert set(sm["chars"]) == {"PPO", "SFT"} and all(c > 0 for c in sm["chars"].values())
    assert "sampled answers" in report and "`python tools/rm_heldout.py RUN_DIR` repeats the check" in report
    # the larger sampled check of a finished run: the bundled questions, seeds pooled
    tool = os.path.join(ROOT, "tools", "rm_heldout.py")
    done = subprocess.run([sys.executable, tool, str(out), "--questions", "3", "--k", "2", "--seeds", "0", "1",
                           "--base", "--models", "PPO", "GRPO", f"again={out / 'ppo'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = json.loads((out / "eval" / "rm_heldout_sampled.json").read_text())
    assert got["questions"] == 3 and set(got["mean"]) == {"SFT", "PPO", "again", "base"}
    assert got["mean"]["again"] == got["mean"]["PPO"]  # the same adapter, the same seeds: the same answers
    assert set(got["chars"]) == set(got["mean"]) and "mean answer length: SFT" in done.stdout
    assert "PPO - SFT, pooled" in done.stdout and "GRPO: no adapter" in done.stdout
    pooled = [(a + b) / 2 for a, b in zip(got["scores"]["0"]["PPO"], got["scores"]["1"]["PPO"])]
    assert got["mean"]["PPO"] == pytest.approx(sum(pooled) / 3)
    bad = subprocess.run([sys.executable, tool, str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "finished demo run" in bad.stderr


def test_gpu_profile_runs_on_a_cpu_with_a_tiny_checkpoint(tmp_path, capsys):
    """The gpu-24g profile's recipe (gradient checkpointing in SFT, RM and PPO; K = 8 before --quick) runs
    end to end where no GPU is at hand; the compiled decode path is CUDA-only and says so by its absence."""
    model, _ = real_checkpoint(tmp_path / "qwen")
    out = tmp_path / "demo"
    summary = run(out=str(out), quick=True, model=model, size="gpu-24g")
    said = capsys.readouterr().out
    assert summary["size_profile"] == "gpu-24g" and "size profile: gpu-24g (--size" in said
    assert "gradient checkpointing" in said and "compiled decode" not in said
    assert summary["size"]["grad_checkpointing"] and summary["size"]["sft_lr"] == 1e-4
    for stage, name in (("sft", "sft_config.json"), ("rm", "rm_config.json"), ("ppo", "ppo_config.json")):
        assert json.loads((out / stage / name).read_text())["grad_checkpointing"], stage
    assert summary["eval"]["rm_heldout"]["n"] == 10


def test_size_profiles_follow_the_device_and_the_parameter_count():
    assert choose_size(DemoConfig(), "cpu", None)[0] == "tiny"
    assert choose_size(DemoConfig(model="m"), "cpu", 135_000_000)[:1] == ("cpu",)
    assert choose_size(DemoConfig(model="m"), "cuda", 7_000_000_000)[0] == "gpu-24g"
    name, size, why = choose_size(DemoConfig(model="m", size="cpu"), "cpu", 7_000_000_000)
    assert name == "cpu" and "hours for a few billion" in why
    gpu = choose_size(DemoConfig(model="m", size="gpu-24g"), "cpu", 1)[1]
    assert gpu.grad_checkpointing and gpu.compile and gpu.k == 8 and gpu.lora_r == 16
    with pytest.raises(UserError, match="--model"):
        choose_size(DemoConfig(size="cpu"), "cpu", None)
