"""Tests for nanohuatuo.cli: flags from a dataclass, the exit-code-2 wrapper, devices, dtypes, --out policy."""

import os
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


@dataclass
class Bounded:
    lr: float | None = arg(None, "learning rate", bounds="(0, inf)")
    top_p: float = arg(1.0, "nucleus mass", bounds="(0, 1]")
    steps: int = arg(3, "steps", bounds="[1, inf)")
    bias: float = arg(0.0, "any finite number")
    ks: list[int] = arg([2], "several", bounds="[1, inf)")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr 0.0: must be above 0"),
    (["--lr=-1e-4"], "--lr -0.0001: must be above 0"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--bias", "inf"], "--bias inf: must be a finite number"),
    (["--ks", "3,0"], "--ks 0: must be at least 1"),
])
def test_numbers_out_of_their_bounds_are_one_line_before_the_run(capsys, argv, message):
    ran = []
    assert cli_main(ran.append, Bounded, argv) == 2 and not ran
    assert capsys.readouterr().err == f"error: {message}\n"


def test_bounds_pass_the_interval_and_reach_config_files(tmp_path, capsys):
    cfg = parse_config(Bounded, ["--lr", "1e-5", "--top-p", "1", "--steps", "1", "--bias", "-3", "--ks", "1", "5"])
    assert (cfg.lr, cfg.top_p, cfg.steps, cfg.bias, cfg.ks) == (1e-5, 1.0, 1, -3.0, [1, 5])
    assert parse_config(Bounded, []).lr is None  # unset passes
    (tmp_path / "c.toml").write_text("top_p = 2.0\n")
    assert cli_main(lambda cfg: None, Bounded, ["--config", str(tmp_path / "c.toml")]) == 2
    assert capsys.readouterr().err == "error: --top-p 2.0: must be in (0, 1]\n"
    with pytest.raises(ValueError, match="write an interval"):
        arg(1, "x", bounds="1..2")


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Config, ["--steps", "abc"], prog="x.py")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --steps: invalid int value: 'abc' (see x.py --help)\n"


@pytest.mark.parametrize("module, argv, message", [
    ("sft", ["--lr", "-1"], "--lr -1.0: must be above 0"),
    ("dpo", ["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be at least 0"),  # was gradient ascent
    ("ppo", ["--max-steps", "0"], "--max-steps 0: must be at least 1"),  # was "unset"
    ("grpo", ["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    ("reward", ["--lora-r", "-1"], "--lora-r -1: must be at least 0"),
    ("sampling", ["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    ("evaluate", ["pairwise", "--limit", "-1"], "--limit -1: must be at least 0"),  # was all but the last
    ("prepare", ["mix", "--total", "-3"], "--total -3: must be at least 1"),
    ("distill", ["polish", "--timeout", "-1"], "--timeout -1.0: must be above 0"),
    ("feedback", ["rank", "--timeout", "-1"], "--timeout -1.0: must be above 0"),
    ("chat", ["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be above 0"),
    ("serve", ["--port", "70000"], "--port 70000: must be in [0, 65535]"),
])
def test_commands_refuse_numbers_out_of_bounds(capsys, module, argv, message):
    import importlib
    assert importlib.import_module(f"nanohuatuo.{module}").main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_every_number_a_command_takes_has_bounds():
    """A new numeric flag states the interval it must lie in (seeds and penalties take any integer or
    number), so an out-of-range value is refused before a run rather than trained on."""
    import dataclasses
    import types
    from nanohuatuo import chat, distill, dpo, evaluate, feedback, grpo, ppo, prepare, reward, sampling, serve, sft
    unbounded = set()
    for mod in (chat, distill, dpo, evaluate, feedback, grpo, ppo, prepare, reward, sampling, serve, sft):
        for cls in vars(mod).values():
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == mod.__name__):
                continue
            for f in dataclasses.fields(cls):
                typ = f.type
                if isinstance(typ, types.UnionType):
                    typ = next(t for t in typ.__args__ if t is not type(None))
                if typ in (int, float) and "help" in f.metadata and not f.metadata.get("bounds"):
                    unbounded.add(f.name)
    assert unbounded == {"seed", "missing_eos_penalty"}


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


def test_an_os_error_names_the_file_then_why(tmp_path, capsys):
    """Not "[Errno 21] Is a directory: '.out.tmp' -> 'out'": the file the user named, then the reason."""
    from nanohuatuo.cli import guarded

    def rename():  # an atomic write's last step onto a directory
        (tmp_path / ".out.tmp").write_text("x")
        (tmp_path / "out").mkdir()
        os.replace(tmp_path / ".out.tmp", tmp_path / "out")

    def missing():
        open(tmp_path / "nope.jsonl")

    assert guarded(rename) == 2 and capsys.readouterr().err == f"error: {tmp_path / 'out'}: Is a directory\n"
    assert guarded(missing) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.jsonl'}: No such file or directory\n"


def test_out_may_not_be_or_hold_an_input(tmp_path):
    """--out equal to --model (or holding --data) with --overwrite deleted the model before training read it."""
    from types import SimpleNamespace
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = SimpleNamespace(model=str(model), data=[str(tmp_path / "data.jsonl")], template="huatuo",
                          reward_fn=f"{tmp_path / 'data.jsonl'}:fn")
    with pytest.raises(UserError, match=r"--out .*base is --model .*base: the run would write over what it reads"):
        prepare_out(model, overwrite=True, inputs=cfg)
    assert (model / "config.json").exists()
    with pytest.raises(UserError, match=r"holds --data .*data.jsonl"):
        prepare_out(tmp_path, overwrite=True, inputs=SimpleNamespace(data=cfg.data))
    with prepare_out(tmp_path / "runs" / "sft", inputs=cfg):  # anywhere else is fine
        pass
    with pytest.raises(UserError, match=r"holds --reward-fn"):
        prepare_out(tmp_path, overwrite=True, inputs=SimpleNamespace(reward_fn=f"{tmp_path / 'data.jsonl'}:fn"))
