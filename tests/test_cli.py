"""Tests for nanohuatuo.cli: flags from a dataclass, the exit-code-2 wrapper, devices, dtypes, --out policy."""

from dataclasses import dataclass

import pytest
import torch

from nanohuatuo.cli import UserError, arg, cli_main, make_parser, parse_config, prepare_out, resolve_dtype, \
    resolve_device


@dataclass
class Config:
    model: str = arg("", "model directory")
    lora_targets: list[str] = arg(["q_proj"], "LoRA targets", metavar="NAME")
    weights: dict | None = arg(None, "per-source weights")
    steps: int = arg(3, "steps")
    merge: bool = arg(False, "merge at the end")
    seed: int = arg(0, "random seed")


def test_flags_from_fields_with_help_and_defaults():
    text = make_parser(Config).format_help()
    assert "(default: 3)" in text and "(default: q_proj)" in text and "--no-merge" in text
    cfg = parse_config(Config, ["--lora-targets", "a,b", "c", "--weights", "x=1,y=2.5", "--merge", "--steps", "5"])
    assert cfg == Config(model="", lora_targets=["a", "b", "c"], weights={"x": 1.0, "y": 2.5}, steps=5,
                         merge=True, seed=0)


def test_field_without_help_is_refused():
    @dataclass
    class Bad:
        x: int = 1
    with pytest.raises(TypeError, match="no help text"):
        make_parser(Bad)


def test_user_error_is_one_line_and_exit_2(capsys):
    def run(cfg):
        raise UserError("data.jsonl:3: no messages")
    assert cli_main(run, Config, []) == 2
    assert capsys.readouterr().err == "error: data.jsonl:3: no messages\n"
    assert cli_main(lambda cfg: None, Config, []) == 0


def test_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(UserError, match="loss scaling"):
        resolve_dtype("float16", "cpu", training=True)
    with pytest.raises(UserError, match="use auto"):
        resolve_dtype("bf17", "cpu")


def test_out_policy_and_lock(tmp_path):
    out = tmp_path / "run"
    lock = prepare_out(out)
    with pytest.raises(UserError, match="in use by another run"):
        prepare_out(out, resume=True)
    lock.release()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="--resume"):
        prepare_out(out)
    prepare_out(out, resume=True).release()
    assert (out / "metrics.jsonl").exists()
    prepare_out(out, overwrite=True).release()
    assert [p.name for p in out.iterdir()] == [".lock"]


@dataclass
class Renamed:
    data: list[str] = arg([], "input files", old=("--in",))
    save_merged: bool = arg(False, "write the merged model", old=("--merge",))
    judge: str = arg("endpoint", "who judges", choices=["endpoint", "offline"], old_values={"openai": "endpoint"})
    max_retries: int = arg(5, "client retries", retired="--attempts")


def test_old_spellings_work_hidden_with_one_line_of_deprecation(capsys):
    text = make_parser(Renamed).format_help()
    assert "--data" in text and "--save-merged" in text
    assert not any(old in text for old in ("--in ", "--merge", "openai", "--max-retries"))
    cfg = parse_config(Renamed, ["--in", "a,b", "--merge", "--judge", "openai", "--max-retries", "2"])
    assert cfg == Renamed(data=["a", "b"], save_merged=True, judge="endpoint", max_retries=2)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --in is deprecated and will be removed in the next release; use --data",
        "warning: --merge is deprecated and will be removed in the next release; use --save-merged",
        "warning: --judge openai is deprecated and will be removed in the next release; use --judge endpoint",
        "warning: --max-retries is deprecated and will be removed in the next release; use --attempts"]
    assert parse_config(Renamed, ["--no-merge"]) == Renamed()
    assert "use --no-save-merged" in capsys.readouterr().err
    assert parse_config(Renamed, []) == Renamed() and capsys.readouterr().err == ""
