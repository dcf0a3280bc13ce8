"""Bad input through every command: one line on stderr, exit code 2, no traceback.

One tiny model directory is built and copied into broken variants (no config.json, invalid JSON,
a missing key, an unknown model_type, a missing tensor, a mis-shaped tensor, a truncated
safetensors file, no tokenizer). Every script runs every variant. Starting Python with torch
takes seconds, so all cases run in one child process: a small driver executes each script as
`__main__` once per case (as `python script.py ARGS` would) and records its exit code, stderr
and any exception that escaped. One case also runs as its own process, end to end.
Also here: chat's prompt budget and empty --prompt, and the data CLI's empty inputs.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import tiny_base, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = ["头痛三天了，伴有低烧，需要吃什么药？", "建议多休息，多喝水，体温超过38.5度可以服用退烧药。",
         "孩子咳嗽有痰怎么办？", "可以先观察，注意保暖，如果持续加重请及时就医。"] * 4
QUESTION = "头痛怎么办？"

# case -> what the one line must say besides the directory
CASES = {
    "no_config": ["config.json"],
    "bad_json": ["config.json", "not valid JSON"],
    "missing_key": ["config.json", "hidden_size"],
    "unknown_type": ["config.json", "gpt9", "supported"],
    "missing_tensor": ["model.layers.1.mlp.up_proj.weight", "missing"],
    "bad_shape": ["model.norm.weight", "(7,)"],
    "truncated": ["model.safetensors", "truncated"],
    "no_tokenizer": ["tokenizer"],
}
SCRIPTS = ["chat.py", "train_sft.py", "train_rm.py", "train_dpo.py", "train_ppo.py", "-m nanohuatuo.sampling"]

DRIVER = r'''
import contextlib, io, json, os, runpy, sys, traceback, warnings
import torch
torch.set_num_threads(1)
# `-m nanohuatuo.data` after the package is imported: harmless here, and not what a user sees
warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
spec, where = sys.argv[1:3]  # sys.argv is each case's below
results = []
for case in json.load(open(spec)):
    err, out, code, tb = io.StringIO(), io.StringIO(), 0, None
    target, argv = case["target"], case["argv"]
    sys.argv = [target] + argv
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if target.startswith("-m "):
                runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code, tb = 1, traceback.format_exc()
    results.append({"id": case["id"], "code": code, "stderr": err.getvalue(), "stdout": out.getvalue(),
                    "traceback": tb})
json.dump(results, open(where, "w"))
'''


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"good": dir, case: broken copy} plus the data files the scripts read."""
    tmp = tmp_path_factory.mktemp("bad_input")
    good = tiny_base(tmp / "good", LINES, max_seq_len=512).dir
    out = {"good": good, "tmp": str(tmp)}

    def variant(name):
        d = str(tmp / name)
        shutil.copytree(good, d)
        out[name] = d
        return d

    cfg = json.load(open(os.path.join(good, "config.json")))
    os.remove(os.path.join(variant("no_config"), "config.json"))
    open(os.path.join(variant("bad_json"), "config.json"), "w").write(json.dumps(cfg)[:-10])
    json.dump({k: v for k, v in cfg.items() if k != "hidden_size"},
              open(os.path.join(variant("missing_key"), "config.json"), "w"))
    json.dump(dict(cfg, model_type="gpt9"), open(os.path.join(variant("unknown_type"), "config.json"), "w"))
    sd = load_file(os.path.join(good, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
              os.path.join(variant("missing_tensor"), "model.safetensors"))
    save_file(dict(sd, **{"model.norm.weight": sd["model.norm.weight"][:7].clone()}),
              os.path.join(variant("bad_shape"), "model.safetensors"))
    weights = os.path.join(variant("truncated"), "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    for f in os.listdir(variant("no_tokenizer")):
        if f.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(out["no_tokenizer"], f))
    out["sft"] = write_jsonl(tmp / "sft.jsonl", [
        {"messages": [{"role": "user", "content": LINES[i]}, {"role": "assistant", "content": LINES[i + 1]}],
         "source": "other"} for i in range(0, 8, 2)])
    out["prefs"] = write_jsonl(tmp / "prefs.jsonl", [{"prompt": LINES[i], "answers": [LINES[i + 1], LINES[i]]}
                                                     for i in range(0, 8, 2)])
    out["prompts"] = write_jsonl(tmp / "prompts.jsonl", [
        {"id": f"p{i}", "messages": [{"role": "user", "content": LINES[i]}], "reference": LINES[i + 1]}
        for i in range(0, 8, 2)])
    return out


def _argv(script, model, d, out):
    if script == "chat.py":
        return ["--model", model, "--prompt", QUESTION, "--max-new-tokens", "4", "--device", "cpu"]
    if script == "train_sft.py":
        return ["--model", model, "--data", d["sft"], "--out", out, "--max-steps", "1", "--batch-size", "2",
                "--micro-batch-size", "2", "--device", "cpu"]
    if script in ("train_rm.py", "train_dpo.py"):
        return ["--model", model, "--data", d["prefs"], "--out", out, "--max-steps", "1", "--device", "cpu"]
    if script == "train_ppo.py":  # the policy and the reward model are both the broken directory
        return ["--model", model, "--reward", model, "--data", d["prompts"], "--out", out,
                "--max-steps", "1", "--batch-size", "2", "--device", "cpu"]
    return ["--model", model, "--data", d["prompts"], "--out", os.path.join(out, "samples.jsonl"), "--k", "2",
            "--max-new-tokens", "4", "--device", "cpu"]


def _extra_chat_cases(d):
    """Chat's own refusals and the data CLI's empty inputs, run in chat's child process."""
    empty = os.path.join(d["tmp"], "empty.jsonl")
    open(empty, "w").write("\n")
    out = os.path.join(d["tmp"], "data_out.jsonl")
    strings = os.path.join(d["tmp"], "prompt_strings.jsonl")  # messages as plain strings, not {role, content}
    open(strings, "w").write(json.dumps({"id": "p0", "messages": ["头痛"], "reference": "多休息"}) + "\n")
    same = os.path.join(d["tmp"], "same_answers.jsonl")  # judge items whose answers are all one text
    open(same, "w").write(json.dumps({"id": "q0", "question": "头痛", "reference": "多休息",
                                      "answers": ["多喝水", "多喝水 "]}) + "\n")
    return {
        "empty_prompt": ("chat.py", ["--model", d["good"], "--prompt", "  "]),
        "feedback_nothing_ranked": ("-m nanohuatuo.feedback", ["rank", "--judge", "offline", "--data", same,
                                                               "--out", out]),
        "data_mix_negative": ("-m nanohuatuo.data", ["mix", "--data", d["sft"], "--weights", "other=-1",
                                                     "--out", out]),
        # GB18030 bytes of 发烧 from a terminal in that encoding: Python hands them on as surrogate escapes
        "not_utf8_prompt": ("chat.py", ["--model", d["good"], "--prompt", b"\xb7\xa2\xc9\xd5".decode(
            "utf-8", "surrogateescape")]),
        "prompt_strings": ("-m nanohuatuo.sampling", ["--model", d["good"], "--data", strings, "--out", out]),
        "data_mix_same_out": ("-m nanohuatuo.data", ["mix", "--data", d["sft"], "--weights", "other=1",
                                                     "--heldout", "0.5", "--out", out, "--heldout-out", out]),
        "budget": ("chat.py", ["--model", d["good"], "--prompt", QUESTION, "--max-new-tokens", "1024"]),
        "long_question": ("chat.py", ["--model", d["good"], "--prompt", "头痛" * 400, "--max-new-tokens", "8",
                                   "--template", "huatuo"]),
        "data_convert_empty": ("-m nanohuatuo.data", ["convert", "--format", "huatuo_sft", "--data", empty,
                                                      "--out", out]),
        "data_prompts_empty": ("-m nanohuatuo.data", ["prompts", "--data", empty, "--out", out]),
        "data_mix_empty": ("-m nanohuatuo.data", ["mix", "--data", empty, "--weights", "other=1", "--out", out]),
    }


@pytest.fixture(scope="module")
def results(dirs):
    """{(script, case): {"code", "stderr", "stdout", "traceback"}}, from one child process."""
    tmp = dirs["tmp"]
    cases = []
    for i, script in enumerate(SCRIPTS):
        cases += [{"id": [script, case], "target": script,
                   "argv": _argv(script, dirs[case], dirs, os.path.join(tmp, f"out_{i}_{case}"))} for case in CASES]
    cases += [{"id": ["chat.py", k], "target": t, "argv": a} for k, (t, a) in _extra_chat_cases(dirs).items()]
    spec, res = os.path.join(tmp, "cases.json"), os.path.join(tmp, "results.json")
    json.dump(cases, open(spec, "w"))
    proc = subprocess.run([sys.executable, "-c", DRIVER, spec, res], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and os.path.exists(res), proc.stdout[-2000:] + proc.stderr[-2000:]
    return {tuple(r["id"]): r for r in json.load(open(res))}


def _one_line_exit_2(r, *needles):
    assert r["traceback"] is None, r["traceback"]
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["code"] == 2 and len(lines) == 1, f"exit {r['code']}, stderr:\n{r['stderr']}"
    assert lines[0].startswith("error: ") and "Traceback" not in r["stderr"]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_model_directory(results, dirs, script, case):
    _one_line_exit_2(results[script, case], os.path.basename(dirs[case]), *CASES[case])


def test_one_case_as_its_own_process(dirs):
    r = subprocess.run([sys.executable, "chat.py", "--model", dirs["truncated"], "--prompt", QUESTION], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    _one_line_exit_2({"code": r.returncode, "stderr": r.stderr, "traceback": None}, "truncated", "model.safetensors")


def test_chat_refuses_an_empty_prompt(results):
    _one_line_exit_2(results["chat.py", "empty_prompt"], "--prompt is empty")


def test_chat_refuses_a_prompt_not_in_utf8(results):
    _one_line_exit_2(results["chat.py", "not_utf8_prompt"], "--prompt is not UTF-8 text", "GBK")


def test_prompt_records_and_a_mix_that_would_overwrite_itself(results, dirs):
    _one_line_exit_2(results["chat.py", "prompt_strings"], "prompt_strings.jsonl:1: messages[0] must be an object")
    _one_line_exit_2(results["chat.py", "data_mix_same_out"], "--heldout-out", "would overwrite the mix")
    _one_line_exit_2(results["chat.py", "data_mix_negative"], "other=-1", "a weight is at least 0")
    err = results["chat.py", "feedback_nothing_ranked"]["stderr"]  # the count of what was dropped, then why
    assert results["chat.py", "feedback_nothing_ranked"]["code"] == 2 and "dropped 1 items" in err
    assert err.strip().splitlines()[-1].startswith("error: no usable ranking among the 1 judge items")
    assert not os.path.exists(os.path.join(dirs["tmp"], "data_out.jsonl"))


def test_chat_prompt_budget(results):
    # --max-new-tokens 1024 used to feed the model one prompt token; now the budget is refused
    _one_line_exit_2(results["chat.py", "budget"], "--max-new-tokens 1024 leaves no room", "512-token context")
    _one_line_exit_2(results["chat.py", "long_question"], "the question is", "tokens, but only 504")


@pytest.mark.parametrize("command", ["convert", "prompts", "mix"])
def test_data_empty_input(results, dirs, command):
    _one_line_exit_2(results["chat.py", f"data_{command}_empty"], "empty.jsonl", "empty")
    assert not os.path.exists(os.path.join(dirs["tmp"], "data_out.jsonl"))
