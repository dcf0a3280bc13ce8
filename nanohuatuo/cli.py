"""One command-line convention for every script: flags generated from a config dataclass.

    @dataclass
    class Config:
        model: str = arg("", "model directory (Hugging Face layout)")
        data: list[str] = arg([], "input JSONL file(s)", metavar="FILE")
        resume: bool = arg(False, "continue the run in --out")

    def run(cfg: Config): ...                      # raise UserError("what, where, what to do")
    def main(argv=None) -> int:
        return cli_main(run, Config, argv, prog="x.py", description=__doc__)

What it holds:
- `arg`: a dataclass field carrying its help text (and metavar, choices, a parser, the interval
  its number must lie in: `bounds="(0, inf)"`), so a flag can never lose its documentation or its
  range; `parse_config` builds argparse from the fields and shows every default. A number out of
  its interval, or not finite, is refused with the flag named before anything runs; a bad flag
  is one line (the usage is --help's). Booleans are `--x/--no-x`; lists take space-separated
  values, each also split on commas (`--lora-targets q_proj,v_proj` and `--lora-targets q_proj
  v_proj` are the same); dicts are `k=v,k=v`.
- Flag groups, one flag per concept everywhere (the README's flag table): `ModelFlags`,
  `DeviceFlags`, `LoRAFlags`, `OutputFlags`, `TrainLoopFlags`, `ExportFlags`, `GenerationFlags`,
  and `endpoint_flags(role, who)` (--ROLE-base-url, --ROLE-model-name, --ROLE-api-key; llm.from_flags
  builds the client). A config inherits the groups it needs; `like(group, name, default)` changes a
  field's default or help, never its flag. `arg(old=...)` keeps a renamed flag's earlier spellings for
  one release, hidden from --help, with a one-line deprecation on stderr (`old_values` for a choice,
  `retired` for a flag leaving the vocabulary).
- `--config FILE` (every command): flag values from a TOML, JSON or YAML file, keys named as the
  fields or flags (`lora_r` or `lora-r`); flags given on the command line win, an unknown key or a
  value of the wrong type is one line naming the file and the key. `write_config` writes the
  resolved config into --out as JSON, which `--config` reads back, so a run can be repeated.
- `cli_main`: runs a command and turns user errors into one line on stderr and exit code 2,
  never a traceback (Ctrl-C exits 130).
- `resolve_device`, `resolve_dtype`: the one place a device or dtype name becomes a torch object.
- `prepare_out`: the one policy for an existing output directory (refuse unless --resume or
  --overwrite) and an exclusive lock on it for the whole run.
"""

import argparse
import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import types
from dataclasses import field
from pathlib import Path

COMMON_HELP = {  # the same words for the same flag in every script
    "device": "auto (cuda if available), cpu, cuda, cuda:1, ...",
    "dtype": "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16",
    "seed": "random seed",
    "resume": "continue the interrupted run in --out",
    "overwrite": "delete what --out holds and start again",
}
DTYPES = ("float32", "bfloat16", "float16")  # torch is imported only where a device or dtype is resolved:
# the LLM-only commands (distill.py, feedback, evaluate with endpoints) start without it


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong, where, and what to do."""


def arg(default, help: str, metavar: str | None = None, choices=None, parse=None, flag: str | None = None,
        old: tuple = (), old_values: dict | None = None, retired: str | None = None, bounds: str | None = None):
    """A config field with its command-line help text (and optional metavar, choices, parser, and a flag
    name for a field whose name cannot be one, e.g. flag="--in" for a field `input`).

    bounds: the interval a number must lie in, "[1, inf)" (at least 1), "(0, inf)" (above 0), "(0, 1]";
    None passes (unset). Every float must be finite, bounded or not.

    old: earlier spellings of the flag, still accepted for one release but not shown in --help, with a
    one-line deprecation on stderr; old_values: earlier spellings of a choice, {old: new}, the same way;
    retired: a flag leaving the vocabulary, still working for one release, hidden, warning what to use instead."""
    if bounds is not None:
        _interval(bounds)  # a malformed interval fails at import, not when a user passes the flag
    meta = {"help": help, "metavar": metavar, "choices": choices, "parse": parse, "flag": flag,
            "old": tuple(old), "old_values": dict(old_values or {}), "retired": retired, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _interval(bounds: str):
    """(low, low included, high, high included) of "[1, inf)", "(0, 1]", ..."""
    try:
        lo, hi = (float(x) for x in bounds[1:-1].split(","))
    except ValueError:
        lo = hi = math.nan
    if bounds[:1] not in ("[", "(") or bounds[-1:] not in ("]", ")") or not lo <= hi:
        raise ValueError(f"bounds {bounds!r}: write an interval such as '[1, inf)' or '(0, 1]'")
    return lo, bounds[0] == "[", hi, bounds[-1] == "]"


def check_value(name: str, value, bounds: str | None) -> None:
    """UserError naming the flag unless a number is finite and within `bounds`; None (unset) passes."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} {value}: must be a finite number")
    if bounds is None:
        return
    lo, lo_in, hi, hi_in = _interval(bounds)
    if (value > lo or lo_in and value == lo) and (value < hi or hi_in and value == hi):
        return
    if hi == math.inf:
        need = f"at least {lo:g}" if lo_in else f"above {lo:g}"
    else:
        need = f"in {bounds}"
    raise UserError(f"{name} {value}: must be {need}")


def parse_kv(text: str) -> dict[str, float]:
    """'a=1,b=2.5' -> {'a': 1.0, 'b': 2.5}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected NAME=NUMBER") from None
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{part!r}: expected NAME=NUMBER")
        if not math.isfinite(out[key.strip()]):
            raise argparse.ArgumentTypeError(f"{part!r}: the number must be finite")
    return out


def _bare(typ):
    """X for `X | None`; the type itself otherwise."""
    if isinstance(typ, types.UnionType):
        return next(t for t in typ.__args__ if t is not type(None))
    return typ


def _split_lists(values):
    return [v for item in values for v in str(item).split(",") if v]  # a default list may hold numbers


def deprecated(old: str, new: str) -> None:
    """The one-line warning for a spelling kept for one release."""
    print(f"warning: {old} is deprecated and will be removed in the next release; use {new}", file=sys.stderr)


def _deprecated_action(action_cls, new: str):
    """action_cls that warns first: the hidden alias of a renamed flag."""
    class Deprecated(action_cls):
        def __call__(self, parser, namespace, values, option_string=None):
            deprecated(option_string, new if not option_string.startswith("--no-") else "--no-" + new[2:])
            super().__call__(parser, namespace, values, option_string)
    return Deprecated


def _renaming(convert, old_values: dict, name: str):
    """convert, after mapping an old choice to its new spelling (with the warning)."""
    def parse(text):
        if text in old_values:
            deprecated(f"{name} {text}", f"{name} {old_values[text]}")
            text = old_values[text]
        return convert(text)
    return parse


def flag(name: str, f=None) -> str:
    """The command-line flag of a field: its own (arg(flag=...)) or --field-name."""
    if f is not None and f.metadata.get("flag"):
        return f.metadata["flag"]
    return "--" + name.replace("_", "-")


def add_fields(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the dataclass cls, help and default from the field (and its old spellings, hidden)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f.metadata.get("help") or COMMON_HELP.get(f.name)
        if not help:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with cli.arg(default, help)")
        if default not in (None, [], {}, "") and not isinstance(default, bool):
            help += f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
        kw = {"help": help, "default": default, "dest": f.name}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        typ = _bare(f.type)
        origin = getattr(typ, "__origin__", None)
        name = flag(f.name, f)
        if f.metadata.get("parse"):
            kw["type"] = f.metadata["parse"]
        elif typ is bool:
            kw["help"] += f" (default: {'on' if default else 'off'})"
            kw["action"] = argparse.BooleanOptionalAction
        elif typ is dict or origin is dict:
            kw.setdefault("metavar", "NAME=W,...")
            kw["type"] = parse_kv
        elif typ is list or origin is list:
            inner = (getattr(typ, "__args__", None) or (str,))[0]
            kw.update(nargs="+", type=str)
            p.set_defaults(**{f"_list_{f.name}": inner})
        else:
            kw["type"] = typ
        if f.metadata.get("old_values"):
            kw["type"] = _renaming(kw.get("type", str), f.metadata["old_values"], name)
        if f.metadata.get("retired"):
            kw.update(help=argparse.SUPPRESS, action=_deprecated_action(
                argparse.BooleanOptionalAction if typ is bool else argparse._StoreAction, f.metadata["retired"]))
        action = p.add_argument(name, **kw)
        for old in f.metadata.get("old") or ():
            p.add_argument(old, **{**kw, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS,
                                   "action": _deprecated_action(type(action), name)})


def config_from(cls, ns: argparse.Namespace):
    """The dataclass cls from parsed arguments (list flags split on commas and converted), every number
    checked against its field's bounds (UserError naming the flag)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        inner = getattr(ns, f"_list_{f.name}", None)
        if inner is not None and isinstance(v, list):
            try:
                v = [inner(x) for x in _split_lists(v)]
            except ValueError as e:
                raise UserError(f"{flag(f.name, f)}: {e}") from None
        for item in v if isinstance(v, list) else [v]:
            check_value(flag(f.name, f), item, f.metadata.get("bounds"))
        values[f.name] = v
    return cls(**values)


class Parser(argparse.ArgumentParser):
    """argparse with a bad flag answered in one line: the usage is what --help prints."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(cls, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(p, cls)
    add_config_flag(p)
    return p


def parse_config(cls, argv=None, prog: str | None = None, description: str | None = None):
    """cls from the command line: one flag per field (--lora-r, --batch-size, ...), over --config FILE."""
    return config_from(cls, parse_args(make_parser(cls, prog, description), cls, argv))


# ----------------------------------------------------------------------------- config files

CONFIG_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="read flag values from a TOML, JSON or YAML file (keys as the "
                   "flags, e.g. lora_r = 16); flags on the command line win. A run's resolved config, the "
                   "*_config.json in its --out, is such a file")


def parse_args(parser: argparse.ArgumentParser, cls, argv=None) -> argparse.Namespace:
    """parser.parse_args(argv) over the values of --config FILE (when given): the file's values become the
    defaults, so any flag on the command line overrides them. A bad file exits 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.partition("=")[2]
    if path and not {"-h", "--help"} & set(argv):
        try:
            parser.set_defaults(**config_values(cls, path))
        except UserError as e:
            parser.exit(2, f"error: {e}\n")
    return parser.parse_args(argv)


def read_config_file(path) -> dict:
    """The mapping a TOML (tomllib), JSON or YAML (PyYAML, when installed) file holds."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise UserError(f"--config {path}: expected a {', '.join(CONFIG_SUFFIXES)} file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    try:
        if suffix == ".toml":
            import tomllib
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise UserError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                                f"or write the file as TOML") from None
            values = yaml.safe_load(text)
    except UserError:
        raise
    except Exception as e:  # each parser has its own error class; all say where in the file
        raise UserError(f"--config {path}: not valid {suffix[1:].upper()}: {e}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a table of flag = value, got {type(values).__name__}")
    return values


def config_values(cls, path) -> dict:
    """{field name: value} from a config file, each key checked against cls's fields (by field or flag name)
    and each value against the field's type; list values become strings, as config_from expects."""
    fields = {}
    for f in dataclasses.fields(cls):
        fields[f.name] = fields[f.name.replace("_", "-")] = fields[flag(f.name, f).lstrip("-")] = f
    out = {}
    for key, value in read_config_file(path).items():
        f = fields.get(str(key))
        if f is None:
            raise UserError(f"--config {path}: unknown key {key!r} (no such flag; see --help)")
        out[f.name] = file_value(f, value, f"--config {path}: {key}")
    return out


def file_value(f, value, where: str):
    """A config file's value for field f, checked (and converted as the flag's parser would)."""
    typ = _bare(f.type)
    origin = getattr(typ, "__origin__", None)
    number = (int, float)
    if value is None:
        if isinstance(f.type, types.UnionType) or f.default is None:
            return None
        raise UserError(f"{where}: null is not a value here")
    if f.metadata.get("parse") and isinstance(value, str):
        try:
            return f.metadata["parse"](value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ in (int, float):
        ok = isinstance(value, typ if typ is int else number) and not isinstance(value, bool)
    elif typ is list or origin is list:
        value = value if isinstance(value, list) else [value]
        ok = all(isinstance(v, (str, *number)) and not isinstance(v, bool) for v in value)
        value = [str(v) for v in value]
    elif typ is dict or origin is dict:
        ok = isinstance(value, dict) and all(isinstance(v, number) and not isinstance(v, bool) for v in value.values())
    elif typ is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise UserError(f"{where}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
    if f.metadata.get("choices") and value not in f.metadata["choices"]:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, f.metadata['choices']))}")
    return float(value) if typ is float else value


def write_config(out, cfg, name: str) -> Path:
    """The resolved config as out/<name>_config.json (atomically), a file `--config` reads back."""
    path = Path(out) / f"{name}_config.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- flag groups
# One concept, one flag, in every script: a config inherits the groups it needs (fields of the first base
# listed come last in --help) and redeclares a field with like() only to change its default or help.


def like(group, name: str, default=dataclasses.MISSING, help: str | None = None, **meta):
    """The field `name` of a flag group with another default (or help text): the same flag, per-script default."""
    f = group.__dataclass_fields__[name]
    kw = {**f.metadata, **meta, "help": help or f.metadata["help"]}
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return arg(default, **kw)


@dataclasses.dataclass
class DeviceFlags:
    device: str = arg("auto", COMMON_HELP["device"])
    dtype: str = arg("auto", COMMON_HELP["dtype"], choices=["auto", *DTYPES])


@dataclasses.dataclass
class ModelFlags(DeviceFlags):
    model: str = arg("", "model directory (Hugging Face layout: config.json, safetensors, tokenizer)")
    template: str = arg("auto", "chat template: auto (the model's own, else HuatuoGPT's), a name (huatuo, huatuo2, "
                                "chatml, ...) or a .jinja file")


@dataclasses.dataclass
class LoRAFlags:
    lora_r: int = arg(8, "LoRA rank; 0 trains all weights", bounds="[0, inf)")
    lora_alpha: float = arg(16.0, "LoRA alpha (scaling alpha / r)", bounds="(0, inf)")
    lora_targets: list[str] = arg([], "LoRA target modules (default: every attention and MLP linear of the family)",
                                  metavar="NAME")


@dataclasses.dataclass
class OutputFlags:
    out: str = arg("out", "output directory")
    resume: bool = arg(False, COMMON_HELP["resume"])
    overwrite: bool = arg(False, COMMON_HELP["overwrite"])


@dataclasses.dataclass
class TrainLoopFlags(OutputFlags):
    """The training loop every trainer shares: steps, batches, clipping, checkpoints."""
    max_steps: int | None = arg(None, "optimizer steps in all (default: --epochs over the data)", bounds="[1, inf)")
    stop_after: int | None = arg(None, "stop after this step as if interrupted (checkpoint written; resume later)",
                                 bounds="[1, inf)")
    batch_size: int = arg(32, "prompts or conversations per optimizer step, over all processes", bounds="[1, inf)")
    micro_batch_size: int = arg(2, "rows per forward/backward per process (gradient accumulation = the rest)",
                                bounds="[1, inf)")
    max_grad_norm: float = arg(1.0, "clip the global gradient norm to this (0: no clipping)", bounds="[0, inf)")
    grad_checkpointing: bool = arg(False, "recompute each block's activations in backward (less memory)")
    save_every: int = arg(200, "checkpoint every N steps (and at the end)", bounds="[1, inf)")
    keep_checkpoints: int = arg(1, "checkpoints kept in out/checkpoints (older ones are deleted)", bounds="[1, inf)")


@dataclasses.dataclass
class ExportFlags:
    """What a policy trainer writes besides its adapter."""
    save_merged: bool = arg(False, "also write OUT/merged: a full model with the adapters folded in",
                            old=("--merge",))


@dataclasses.dataclass
class GenerationFlags:
    max_new_tokens: int = arg(256, "most new tokens in one answer", bounds="[1, inf)")
    temperature: float | None = arg(None, "sampling temperature, 0 is greedy (default: generation_config.json's, "
                                          "else 0.7)", bounds="[0, inf)")
    top_p: float | None = arg(None, "nucleus sampling mass (default: generation_config.json's, else 1.0: off)",
                              bounds="(0, 1]")
    top_k: int | None = arg(None, "sample among the k likeliest tokens (default: generation_config.json's, "
                                  "else 0: off)", bounds="[0, inf)")


def endpoint_flags(role: str, who: str, old: dict | None = None) -> type:
    """The flags of one OpenAI-compatible endpoint playing a role, prefixed by it: endpoint_flags("judge", ...)
    gives --judge-base-url, --judge-model-name, --judge-api-key (role "": our model behind an endpoint,
    --base-url ...). old: {field: earlier spellings}. llm.from_flags(cfg, role) builds the client."""
    pre, dash = (f"{role}_", f"--{role}-") if role else ("", "--")
    old = old or {}
    fields = [("base_url", str, "", f"{who}: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1", "URL"),
              ("model_name", str, "", f"{who}: model name at {dash}base-url", "NAME"),
              ("api_key", str | None, None, f"{who}: API key (default: $NANOHUATUO_API_KEY, $OPENAI_API_KEY, "
                                            "else EMPTY for local servers)", "KEY")]
    return dataclasses.make_dataclass(
        f"{role.title()}EndpointFlags",
        [(pre + name, typ, arg(default, help, metavar=metavar, old=old.get(name, ())))
         for name, typ, default, help, metavar in fields])


USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, UnicodeDecodeError, OSError)


def cli_main(run, cls, argv=None, prog: str | None = None, description: str | None = None) -> int:
    """Parse argv into cls, call run(cfg); a user error becomes `error: ...` on stderr and exit code 2."""
    return guarded(lambda: run(parse_config(cls, argv, prog, description)))


def commands_main(commands: dict, argv=None, prog: str = "") -> int:
    """A script of several commands (`evaluate.py pairwise ...`, `data.py mix ...`): the first argument
    names one of `commands` {name: (run, config class, one-line description)}, the rest are its flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = (f"usage: {prog} {{" + ",".join(commands) + "} [flags]\n\n" +
             "\n".join(f"  {name:9s} {desc}" for name, (_, _, desc) in commands.items()) +
             f"\n\n`{prog} COMMAND --help` lists a command's flags.")
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv:  # asked for nothing: what there is to ask
        print(usage, file=sys.stderr)
        return 2
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(commands)} (see {prog} --help)",
              file=sys.stderr)
        return 2
    run, cls, desc = commands[argv[0]]
    return cli_main(run, cls, argv[1:], prog=f"{prog} {argv[0]}", description=desc)


def guarded(fn, *args) -> int:
    """fn(*args) -> exit code: 0 (or fn's int), 2 with one line on a user error, 130 on Ctrl-C."""
    try:
        code = fn(*args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if isinstance(e, OSError) and e.strerror and e.filename:
            # the file, then why: "out.jsonl: Is a directory", not "[Errno 21] ... '.out.jsonl.tmp' -> 'out.jsonl'"
            at_target = e.filename2 and e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
            e = f"{e.filename2 if at_target else e.filename}: {e.strerror}"
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def resolve_device(name: str | None = "auto"):
    """'auto' -> cuda if available else cpu; otherwise the named device (checked): a torch.device."""
    import torch
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str | None, device, training: bool = False):
    """'auto' -> bfloat16 on CUDA, float32 on CPU; float16 is refused for training (no loss scaling)."""
    import torch
    device = torch.device(device)
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name) if name in DTYPES else None
    if dtype is None:
        raise UserError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    if training and dtype == torch.float16:
        raise UserError("--dtype float16: training in float16 needs loss scaling, which nanohuatuo does not do; "
                        "use bfloat16 (or float32)")
    return dtype


class OutLock:
    """An exclusive lock on an output directory, held until release() (or the end of a `with`)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


LOCK_NAME = ".lock"


# the flags that name what a run reads: --out may neither be one of them nor hold one
INPUT_FLAGS = ("model", "adapter", "reward", "data", "eval_data", "norm_samples", "reward_fn", "template",
               "reward_template", "a_model", "a_adapter", "a_answers", "a_template", "b_model", "b_adapter",
               "b_answers", "b_template", "answers")


def check_inputs_outside(out: Path, cfg) -> None:
    """Refuse an --out that is, or holds, a file or directory the run reads (cfg's INPUT_FLAGS): --overwrite would
    delete it first, and the outputs (config.json, the tokenizer, adapter files) would be written over it."""
    here = out.resolve()
    for name in INPUT_FLAGS:
        values = getattr(cfg, name, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, str) or not value:
                continue
            path = Path(value.rsplit(":", 1)[0] if name == "reward_fn" else value)  # reward_fn: FILE.py:function
            if path.exists() and (path.resolve() == here or here in path.resolve().parents):
                raise UserError(f"--out {out} {'is' if path.resolve() == here else 'holds'} --{name.replace('_', '-')} "
                                f"{value}: the run would write over what it reads (and --overwrite delete it); "
                                f"choose another --out")


def prepare_out(out, resume: bool = False, overwrite: bool = False, main_process: bool = True,
                inputs=None) -> OutLock:
    """Make --out ready for a run and lock it.

    An existing directory that holds anything is refused unless resume (continue what is there)
    or overwrite (delete it first); so is one that is or holds an input of the run's config
    `inputs` (check_inputs_outside). The lock (fcntl on out/.lock) is held for the whole run, so a
    second run on the same --out stops at once instead of interleaving checkpoints and metrics.
    Only the main process of a distributed run touches the directory."""
    out = Path(out)
    if inputs is not None:  # on every process, so all of them stop
        check_inputs_outside(out, inputs)
    if not main_process:
        return OutLock(out, None)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--out {out} is in use by another run (it holds the lock {out / LOCK_NAME}); wait for it "
                        f"to finish or choose another --out") from None
    held = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if held and not resume:
        if not overwrite:
            os.close(fd)
            raise UserError(f"--out {out} already holds a run ({', '.join(sorted(p.name for p in held)[:4])}"
                            f"{', ...' if len(held) > 4 else ''}); pass --resume to continue it, --overwrite to "
                            f"start again, or choose another --out")
        for p in held:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return OutLock(out, fd)
