"""--report-to: MetricsLog forwards every row to the trackers named, PPO's samples as a table, with
fake tracker modules put in sys.modules (no tracker package is needed); a missing package is a
one-line error naming the extra to install."""

import json
import math
import sys
import types

import pytest

from nanohuatuo import dpo, grpo, ppo
from nanohuatuo.metrics import REPORT_TO_HELP, MetricsLog, check_report_to
from nanohuatuo.reward import RMConfig
from nanohuatuo.sft import SFTConfig
from test_ppo import good_fraction, tiny, tiny_cfg  # noqa: F401 (tiny: a fixture)


class Calls(list):
    def __call__(self, name):
        return lambda *a, **kw: self.append((name, a, kw))


def fake_wandb_like(name, calls):
    """A module with wandb's (and trackio's) module-level calls, recording them."""
    m = types.ModuleType(name)
    m.init, m.log, m.finish = calls("init"), calls("log"), calls("finish")

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data
    m.Table = Table
    return m


def fake_tensorboard(calls):
    m = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("writer", (log_dir,), {}))
        add_scalar, add_text, flush, close = calls("scalar"), calls("text"), calls("flush"), calls("close")
    m.SummaryWriter = SummaryWriter
    return m


@pytest.fixture
def trackers(monkeypatch):
    calls = {"wandb": Calls(), "trackio": Calls(), "tensorboard": Calls()}
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb_like("wandb", calls["wandb"]))
    monkeypatch.setitem(sys.modules, "trackio", fake_wandb_like("trackio", calls["trackio"]))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tensorboard(calls["tensorboard"]))
    return calls


def test_rows_and_tables_reach_every_tracker(tmp_path, trackers):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl", stream=None, report_to=["wandb", "trackio", "tensorboard"],
                     config={"lr": 0.1})
    back = log.write(1, loss=2.5, lr=0.1, note="text is not a number", kl=float("nan"), tokens=100)
    assert math.isnan(back["kl"])  # a number to the caller; the string "nan" in the file, nothing to the trackers
    log.table("samples", ["prompt", "score"], [["a|b", 0.5]], step=1)
    log.close()
    for name in ("wandb", "trackio"):
        calls = trackers[name]
        assert calls[0][0] == "init" and calls[0][2]["name"] == "run" and calls[0][2]["config"] == {"lr": 0.1}
        logged = [c for c in calls if c[0] == "log"]
        assert logged[0][1][0] == {"loss": 2.5, "lr": 0.1, "tokens_per_s": logged[0][1][0]["tokens_per_s"]}
        assert logged[0][2] == {"step": 1}
        table = logged[1][1][0]["samples"]
        assert table.columns == ["prompt", "score"] and table.data == [["a|b", 0.5]]
        assert calls[-1][0] == "finish"
    tb = trackers["tensorboard"]
    assert tb[0] == ("writer", (str(tmp_path / "run" / "tensorboard"),), {})
    assert [c[1][1:] for c in tb if c[0] == "scalar"][:2] == [("loss", 2.5, 1), ("lr", 0.1, 1)]  # (tag, value, step)
    text = [c for c in tb if c[0] == "text"][0][1]
    assert text[1] == "samples" and "| prompt | score |" in text[2] and "a\\|b" in text[2] and text[3] == 1
    assert tb[-1][0] == "close"
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read())  # metrics.jsonl is written all the same
    assert row["loss"] == 2.5 and row["note"] == "text is not a number" and row["kl"] == "nan"


def test_missing_package_and_unknown_tracker_say_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"pip install -e '\.\[wandb\]'"):
        check_report_to(["wandb"])
    with pytest.raises(ValueError, match="unknown tracker"):
        check_report_to(["mlflow"])
    assert check_report_to([]) == []


def test_every_training_stage_has_the_flag_with_one_help():
    for cfg in (SFTConfig, RMConfig, ppo.PPOConfig, dpo.DPOConfig, grpo.GRPOConfig):
        field = cfg.__dataclass_fields__["report_to"]
        assert field.default_factory() == [] and field.metadata["help"] == REPORT_TO_HELP


def test_ppo_samples_go_as_a_table(tiny, tmp_path, trackers):
    base, _ = tiny
    ppo.train(tiny_cfg(base, tmp_path / "run", sample_every=1, report_to=["wandb"]), reward_fn=good_fraction)
    logged = [c[1][0] for c in trackers["wandb"] if c[0] == "log"]
    assert sum("score" in row for row in logged) == 2  # the two steps' metrics
    tables = [row["samples"] for row in logged if "samples" in row]
    assert len(tables) == 2 and tables[0].columns == ["step", "prompt", "response", "score"]
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert [r[2] for r in tables[0].data + tables[1].data] == [s["response"] for s in samples]


def test_cli_missing_tracker_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trackio", None)
    assert ppo.main(["--model", str(tmp_path), "--data", str(tmp_path / "p.jsonl"), "--report-to", "trackio"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report-to trackio") and "Traceback" not in err


def test_strict_json_writes_non_finite_numbers_as_strings():
    from nanohuatuo.metrics import strict_json
    got = strict_json({"a": [1.0, float("nan"), {"b": float("-inf")}], "c": (2, "x")})
    assert got == {"a": [1.0, "nan", {"b": "-inf"}], "c": [2, "x"]}
    json.dumps(got, allow_nan=False)  # strict
