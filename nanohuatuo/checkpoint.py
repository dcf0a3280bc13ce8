"""Checkpoints and atomic files: the one format SFT, the reward model and PPO write and resume from.

    out/checkpoints/step_000040/      one complete checkpoint per directory, oldest pruned
        state.json                    {"step", "world", "config": the run's config, ...the stage's state}
        optimizer.pt                  the optimizer's state dict (gathered on rank 0 under FSDP)
        rng_rank0.pt, rng_rank1.pt    every process's Python and torch RNG state
        adapter/ | model/ | policy/ critic/    the trained weights, in the layout the stage exports

A checkpoint is written into `.tmp-step_N` and renamed into place once complete (`writing`), so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one.
On resume, `resume_from` finds the last complete checkpoint and `truncate_jsonl` cuts metrics.jsonl
(and any other per-step log) back to the checkpoint's step, so an interrupted run's rows after
its last checkpoint are not written twice; a half-written last line (kill -9 mid-write) is dropped.
`config_changes` lists the settings a resumed run changed, for the stage to refuse or announce;
`unfinish` drops the finished marks of the outputs an earlier run wrote, so a resumed run killed
before it writes its own (e.g. one given a larger --max-steps) never leaves the old ones looking done.

A stage with a plain optimizer writes a checkpoint with `save(out, step, keep, d, config, optimizer,
write_weights, **state)` and resumes with `read_resume(path, config, fixed, ignore)` (its state, the
changed settings, a refusal of changed fixed ones) then, once its weights are in, `restore(path,
optimizer, d, lrs)` (optimizer, this run's learning rates, RNG).

Every file that must never be seen half-written goes through `atomic_write` / `atomic_json` (hf.py's).
"""

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from . import dist
from .cli import UserError
from .hf import atomic_json, atomic_write  # noqa: F401 (hf's, re-exported: the stages write their files through here)

STATE, OPTIMIZER = "state.json", "optimizer.pt"


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moved it
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------- step directories

def checkpoint_dirs(out) -> list[Path]:
    """Complete checkpoints in out/checkpoints, oldest first (one being written is a .tmp- dir)."""
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def resume_from(out, resume: bool, say=print) -> Path | None:
    """The checkpoint a run continues from: the last one in out/checkpoints with resume, else None."""
    if not resume:
        return None
    found = checkpoint_dirs(out)
    if not found:
        say(f"--resume: no checkpoint in {Path(out) / 'checkpoints'}, starting from step 0")
        return None
    return found[-1]


FINISHED = ("adapter_config.json", "config.json", "reward_config.json")  # written last by a stage's outputs


def unfinish(out, say=print) -> None:
    """For --resume: drop what marks OUT's outputs finished (an adapter's or a model's config, a reward model's
    reward_config.json, those of OUT/critic) and OUT/merged, before the run trains on. A run killed before it
    writes its own outputs then leaves none that look done; an earlier run's would pass for its result."""
    out = Path(out)
    gone = [p for d in (out, out / "critic") for p in (d / name for name in FINISHED) if p.is_file()]
    for p in gone:
        p.unlink()
    if (out / "merged").is_dir():
        shutil.rmtree(out / "merged")
        gone.append(out / "merged")
    if gone:
        names = ", ".join(str(p.relative_to(out)) for p in gone)
        say(f"--resume: the outputs in {out} are no longer marked finished ({names} removed); this run writes "
            "them again when it ends")


@contextlib.contextmanager
def writing(out, step: int, keep: int = 1, main: bool = True, barrier=lambda: None):
    """Yields the temporary directory of checkpoint `step`; renamed to step_N when the block ends.

    Every process enters the block (each writes its own RNG file); only the main one creates,
    renames and prunes. `barrier` (dist.barrier of the run) keeps them in step. The `keep` newest
    checkpoints survive."""
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    yield tmp
    barrier()
    if main:
        if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-max(1, keep)]:
            shutil.rmtree(old)
    barrier()


def save_state(ckpt, step: int, config: dict, world: int = 1, **state) -> None:
    """state.json: the step, the number of processes, the run's config and the stage's own state."""
    atomic_json(Path(ckpt) / STATE, {"step": step, "world": world, "config": config, **state})


def read_state(ckpt) -> dict:
    path = Path(ckpt) / STATE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {ckpt} is not a complete checkpoint; delete it and --resume "
                                f"from the one before")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_rng(ckpt, rank: int = 0) -> None:
    torch.save(rng_state(), Path(ckpt) / f"rng_rank{rank}.pt")


def load_rng(ckpt, rank: int = 0) -> None:
    """This process's RNG from the checkpoint (rank 0's when it was written by fewer processes)."""
    path = Path(ckpt) / f"rng_rank{rank}.pt"
    set_rng_state(torch.load(path if path.exists() else Path(ckpt) / "rng_rank0.pt", weights_only=False))


def save_optimizer(ckpt, state_dict) -> None:
    torch.save(state_dict, Path(ckpt) / OPTIMIZER)


def load_optimizer(ckpt, optimizer, device) -> None:
    optimizer.load_state_dict(torch.load(Path(ckpt) / OPTIMIZER, map_location=device, weights_only=True))


def save(out, step: int, keep: int, d, config: dict, optimizer, write_weights, **state) -> None:
    """Checkpoint `step` of a run on every process of `d` (a dist.Dist): on the main one
    write_weights(tmp dir), the optimizer's state and state.json (config and the stage's state);
    on each, its RNG."""
    with writing(out, step, keep, d.main, lambda: dist.barrier(d)) as tmp:
        if d.main:
            write_weights(tmp)
            save_optimizer(tmp, optimizer.state_dict())
            save_state(tmp, step, config, world=d.world, **state)
        save_rng(tmp, d.rank)


def read_resume(path, config: dict, fixed=(), ignore=(), say=print) -> tuple[dict, dict]:
    """(the stage's state as saved, the settings changed since: {name: (old, new)}) of checkpoint
    `path` for a run with `config`. A change to a setting in `fixed` is refused (the checkpoint's
    tensors would not fit); any other is said, the stage applying it from here on."""
    state = read_state(path)
    state.pop("world")
    changed = config_changes(state.pop("config"), config, ignore)
    refused = {k: v for k, v in changed.items() if k in fixed}
    if refused:
        raise UserError(f"--resume: {path} was trained with " + ", ".join(f"{k}={a!r}" for k, (a, _) in refused.items())
                        + "; this run asks for " + ", ".join(f"{k}={b!r}" for k, (_, b) in refused.items())
                        + "; use the checkpoint's values, or start a new run in another --out")
    if changed:
        say(f"resuming {path} with changed settings, applied from here on: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return state, changed


def restore(path, optimizer, d, lrs=None) -> None:
    """The optimizer's state, with this run's learning rates `lrs` (one per group; the saved state
    carries the old ones), and this process's RNG."""
    load_optimizer(path, optimizer, d.device)
    for group, lr in zip(optimizer.param_groups, lrs or ()):
        group["lr"] = lr
    load_rng(path, d.rank)


def config_changes(old: dict, new: dict, ignore=()) -> dict[str, tuple]:
    """{name: (old value, new value)} for every setting that differs, but those in `ignore`."""
    return {k: (old.get(k), v) for k, v in new.items() if k not in ignore and old.get(k) != _plain(v)}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v  # a JSON round trip turns tuples into lists


# ----------------------------------------------------------------------------- per-step logs

def read_jsonl_rows(path) -> list[dict]:
    """The rows of a per-step JSONL log; a torn last line (the process died mid-write) is dropped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): a text in a row may hold U+2028
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"{path}: dropping its half-written last line {i + 1}")
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e.msg}); fix or delete that line") from None
    return rows


def truncate_jsonl(path, step: int) -> None:
    """Keep only rows with "step" <= step (all rows go for step < 0), rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_jsonl_rows(path) if step >= 0 and r.get("step", 0) <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"))
