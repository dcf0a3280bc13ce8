"""Distributed training plumbing: the process group, reductions, DDP/FSDP wrapping, rank-0 gathering.

    d = dist.setup("auto")          # one process, or the group torchrun describes (nccl on CUDA, gloo on CPU)
    loss = dist.all_sum(loss, d)    # floats and dicts of floats over ranks; identity on one process
    wrapped = dist.wrap(module, d, fsdp=False, shard=module.model.layers)
    host = dist.gather_model(model, d, fsdp)      # rank 0: a model whose weights can be written
    dist.close(d)                   # ends the group if setup started it
    dist.exit_process(main())       # a stage script's last line (see exit_process)

Every stage gets a `Dist` (rank, world, device) from `setup` and passes it down; nothing else in
the package looks at torch.distributed.
"""

import contextlib
import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as tdist
import torch.nn as nn

from .cli import resolve_device
from .lora import apply_lora
from .model import Transformer

_GLOO = False  # whether this process started a gloo group (CPU under torchrun): see exit_process


class Dist(NamedTuple):
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # whether setup started the process group (and close ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = "auto") -> Dist:
    """One process on `device`, or the process group torchrun describes (one CUDA device per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, resolve_device(device))
    device = device or "auto"
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not tdist.is_initialized()  # a caller under torchrun may have started it already
    if owns:
        tdist.init_process_group("nccl" if cuda else "gloo")
        global _GLOO
        _GLOO = _GLOO or not cuda
    return Dist(tdist.get_rank(), tdist.get_world_size(), dev, owns)


def close(d: Dist) -> None:
    """End the process group if `setup` started it (a process exiting with it alive aborts)."""
    if d.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def exit_process(code: int):
    """End a stage's script with exit status `code`: sys.exit, except in a process that started a
    gloo group (torchrun on CPU), which flushes its output and ends with os._exit, skipping the
    interpreter's shutdown. Gloo's worker threads outlive the destroyed group (FSDP's device mesh
    keeps it) and may still be dropping the last collective's tensors as Python shuts down; a
    thread that asks for the interpreter then ends the process with SIGABRT ("terminate called
    without an active exception") after a run that finished and wrote everything: 2 of 25 runs of
    the two-process FSDP test on 2 cores, none of 70 since. By then `run` has closed the group and
    every file."""
    if not _GLOO:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def run(device, body):
    """body(d, hold) in this run's process group (torchrun's, or one process), with an ExitStack `hold`
    for what must last the whole run (the lock on --out, a tracker's close); the group is closed
    however the run ends."""
    d = setup(device)
    try:
        with contextlib.ExitStack() as hold:
            return body(d, hold)
    finally:
        close(d)


def barrier(d: Dist) -> None:
    if d.world > 1:
        tdist.barrier()


def all_sum(x: float, d: Dist) -> float:
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    tdist.all_reduce(t)
    return t.item()


def all_mean(values: dict, d: Dist) -> dict:
    """A dict of floats averaged over ranks (one all-reduce); the dict itself on one process."""
    if d.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    tdist.all_reduce(t)
    return dict(zip(keys, (t / d.world).tolist()))


def all_reduce_grads(params, d: Dist) -> None:
    """Average the gradients of params over ranks in one flat all-reduce (for small tensors: LoRA, heads)."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= d.world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def wrap(module: nn.Module, d: Dist, fsdp: bool = False, shard=()) -> nn.Module:
    """DDP, or FSDP with each of `shard` (the transformer blocks) as its own unit and the rest as the
    root; the module itself on one process."""
    if d.world == 1:
        if fsdp:
            print("--fsdp with one process: nothing to shard, training without it", flush=True)
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(d.device.type, (d.world,))  # explicit: the default is CUDA whenever present
        for unit in shard:
            fully_shard(unit, mesh=mesh)
        return fully_shard(module, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel as DDP
    # buffers (RoPE tables, a 4-bit base's weights) are the same on every rank: re-broadcasting them
    # before each forward would move a quantised 7B base (3.5 GB) every micro-batch
    return DDP(module, device_ids=[d.device] if d.device.type == "cuda" else None, gradient_as_bucket_view=True,
               broadcast_buffers=False)


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain CPU tensor (FSDP holds shards: gathering them is a collective)."""
    p = p.detach()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).cpu()


def gather_model(model: Transformer, d: Dist, fsdp: bool) -> Transformer | None:
    """On rank 0, a model whose weights can be written (None on other ranks).

    Without FSDP it is the model itself. With FSDP, every rank gathers the trained tensors one by one
    and rank 0 puts them into a copy built on the meta device (a frozen LoRA base is not gathered:
    only the adapter is written from it)."""
    if not fsdp or d.world == 1:
        return model if d.main else None
    lora = getattr(model, "lora_config", None)
    shadow = None
    if d.main:
        with torch.device("meta"):
            shadow = Transformer(model.config)
        if lora:
            apply_lora(shadow, r=lora["r"], alpha=lora["lora_alpha"], dropout=lora["lora_dropout"],
                       targets=lora["target_modules"], use_rslora=lora["use_rslora"])
            shadow.lora_config = dict(lora)
        shadow.source_dir = getattr(model, "source_dir", None)
    for name, p in model.named_parameters():
        if lora and not p.requires_grad:
            continue
        t = full_tensor(p)
        if shadow is not None:
            parent, _, attr = name.rpartition(".")
            setattr(shadow.get_submodule(parent), attr, nn.Parameter(t, requires_grad=p.requires_grad))
    if shadow is not None and model.config.tie_embeddings and shadow.lm_head is not None:
        shadow.lm_head.weight = shadow.embed_tokens.weight
    return shadow


def optimizer_state(optimizer, wrapped, d: Dist, fsdp: bool):
    """The full optimizer state on rank 0, None elsewhere (FSDP gathers it from the shards)."""
    if not fsdp or d.world == 1:
        return optimizer.state_dict() if d.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer, wrapped, path, d: Dist, fsdp: bool) -> None:
    """Restore an optimizer state that optimizer_state gathered (FSDP: rank 0 reads, then broadcasts)."""
    if not fsdp or d.world == 1:
        optimizer.load_state_dict(torch.load(path, map_location=d.device, weights_only=True))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(path, map_location="cpu", weights_only=True) if d.main else {}
    set_optimizer_state_dict(wrapped, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
