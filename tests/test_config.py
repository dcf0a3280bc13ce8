"""Tests for `--config FILE`: TOML, JSON and YAML files of flag values under the command line's flags,
one-line errors naming the file and the key, and a run's resolved config read back to repeat it."""

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from conftest import tiny_base, write_jsonl

from nanohuatuo import sft
from nanohuatuo.cli import UserError, arg, config_values, parse_config, write_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    model: str = arg("", "model directory")
    data: list[str] = arg([], "input files", metavar="FILE")
    layers: list[int] = arg([1], "layer numbers")
    lr: float = arg(1e-4, "learning rate")
    steps: int = arg(10, "steps")
    max_steps: int | None = arg(None, "stop after this many steps")
    resume: bool = arg(False, "continue")
    weights: dict[str, float] | None = arg(None, "source weights", metavar="SOURCE=W,...")
    dtype: str = arg("auto", "dtype", choices=("auto", "float32", "bfloat16"))
    inputs: str = arg("", "prompt file", flag="--in")


def parse(*argv):
    return parse_config(Config, list(argv), prog="x.py")


def test_a_toml_file_gives_values_and_flags_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "m"\ndata = ["a.jsonl", "b.jsonl"]\nlayers = [2, 3]\nlr = 3e-4\nmax-steps = 5\n'
                    'resume = true\nweights = {a = 1, b = 2.5}\nin = "p.jsonl"\n', encoding="utf-8")
    assert parse("--config", str(path)) == Config(model="m", data=["a.jsonl", "b.jsonl"], layers=[2, 3], lr=3e-4,
                                                  max_steps=5, resume=True, weights={"a": 1, "b": 2.5},
                                                  inputs="p.jsonl")
    cfg = parse(f"--config={path}", "--lr", "1e-3", "--no-resume", "--data", "c.jsonl", "--layers", "7")
    assert (cfg.lr, cfg.resume, cfg.data, cfg.layers, cfg.steps) == (1e-3, False, ["c.jsonl"], [7], 10)
    assert parse("--steps", "3") == Config(steps=3)  # no file: the dataclass's defaults


def test_the_resolved_config_reads_back(tmp_path):
    cfg = Config(model="m", data=["a.jsonl"], layers=[4, 5], lr=2e-5, max_steps=None, weights={"x": 0.5},
                 dtype="float32", inputs="p.jsonl")
    path = write_config(tmp_path, cfg, "x")
    assert path == tmp_path / "x_config.json" and json.loads(path.read_text()) == asdict(cfg)
    assert parse("--config", str(path)) == cfg


def test_yaml_is_read_when_pyyaml_is_installed(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\ndata: [a.jsonl]\n", encoding="utf-8")
    try:
        import yaml  # noqa: F401
        assert (parse("--config", str(path)).lr, parse("--config", str(path)).data) == (1e-3, ["a.jsonl"])
    except ImportError:
        pass  # the error below is what users without PyYAML see
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(UserError, match=r"run.yaml: reading YAML needs PyYAML \(pip install pyyaml\)"):
        config_values(Config, path)


@pytest.mark.parametrize("text, message", [
    ('lr = 1e-4\nlearning_rate = 2\n', r"run.toml: unknown key 'learning_rate' \(no such flag; see --help\)"),
    ('steps = "ten"\n', r"run.toml: steps: expected int, got 'ten'"),
    ('lr = true\n', r"run.toml: lr: expected float, got True"),
    ('dtype = "fp8"\n', r"run.toml: dtype: 'fp8' is not one of auto, float32, bfloat16"),
    ('weights = {a = "x"}\n', r"run.toml: weights: expected dict"),
    ('lr = \n', r"run.toml: not valid TOML: "),
])
def test_a_bad_file_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        config_values(Config, path)


def test_a_script_answers_a_bad_config_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "sft.toml"
    path.write_text('lora_r = 4\nlora_rank = 8\n', encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--config", str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert (r.returncode, r.stderr) == (2, f"error: --config {path}: unknown key 'lora_rank' (no such flag; see "
                                           f"--help)\n")
    assert "--config FILE" in subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--help"],
                                             capture_output=True, text=True, cwd=ROOT).stdout


def test_train_sft_repeats_a_run_from_its_written_config(tmp_path):
    base = tiny_base(tmp_path / "base", ["头疼怎么办？ 多休息。 咳嗽 喝水"], vocab_size=300, max_seq_len=128).dir
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": "other"}
            for q, a in [("头疼怎么办？", "多休息。"), ("咳嗽怎么办？", "多喝水。")] * 2]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "sft.toml").write_text(
        f'model = "{base}"\ndata = ["{data}"]\nout = "{tmp_path / "one"}"\nbatch_size = 4\nmicro_batch_size = 4\n'
        f'max_steps = 1\neval_frac = 0.0\nlr = 1e-3\nallow_high_lr = true\ndevice = "cpu"\nlora_r = 0\n'
        f'template = "huatuo"\n', encoding="utf-8")
    assert sft.main(["--config", str(tmp_path / "sft.toml"), "--seed", "3"]) == 0
    written = json.loads((tmp_path / "one" / "sft_config.json").read_text())
    assert (written["seed"], written["lr"], written["max_steps"]) == (3, 1e-3, 1)
    assert sft.main(["--config", str(tmp_path / "one" / "sft_config.json"), "--out", str(tmp_path / "two")]) == 0
    again = json.loads((tmp_path / "two" / "sft_config.json").read_text())
    assert again == {**written, "out": str(tmp_path / "two")}
    loss = [json.loads(line)["loss"] for name in ("one", "two")
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert len(loss) == 2 and loss[0] == loss[1]
