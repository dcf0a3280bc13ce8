"""The package's shape: imports run one way through the layers, and every command line follows one
convention.

- Layers (the README's code map): core < engine < shared < stages < demo. A module imports only
  its own layer or lower ones, a stage never imports another stage, no `_private` name is
  imported (or reached as `module._name`) from another module, and the imports have no cycle,
  function-local imports included.
- Every script and every `python -m nanohuatuo.X` (and each of its subcommands) answers `--help`
  with help text for every flag, one name per concept (--model, not --base or --policy), dashes
  in flag names, and a seed that defaults to 0.
- The vocabulary (VOCABULARY, the README's flag table): a flag whose help text describes a concept
  carries that concept's one flag (after a role prefix: --judge-base-url, --a-model), every command
  listed for a concept takes its flag, and no command shows a retired spelling.
- No module is over 700 lines.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nanohuatuo"

LAYERS = {  # imports go down (or sideways within a layer, but never between stages)
    "core": {"model", "hf", "lora", "quant", "tokenizer", "templates", "formats", "data", "metrics", "textmetrics", "winrate",
             "textcheck", "jinja_template", "evalsets", "multi_lora"},
    "engine": {"engine", "engine_runner", "token_sampling", "engine_loop", "cpu_kernels", "cpu_int8", "cpu_reduction", "heap",
               "generate"},
    "shared": {"cli", "checkpoint", "dist", "losses", "llm", "adapters", "reward_model", "httpjson",
               "answers", "sheets", "rollout", "reports", "consult", "openai_api", "preferences", "rank_prompt"},
    "stages": {"sft", "reward", "ppo", "dpo", "grpo", "sampling", "feedback", "chat", "serve", "evaluate", "distill",
               "prepare"},
    "top": {"demo", "demo_report", "__init__"},  # __init__: the package's public names, from every layer
}
ORDER = list(LAYERS)
LAYER_OF = {m: layer for layer, mods in LAYERS.items() for m in mods}

SCRIPTS = ["train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py", "train_grpo.py", "chat.py", "serve.py", "evaluate.py",
           "distill.py", "data.py", "demo.py"]
# one concept, one name: flags seen in the wild for a concept this project spells otherwise
SYNONYMS = {
    "--base": "--model", "--policy": "--model", "--model-dir": "--model", "--model-path": "--model",
    "--base-model": "--model", "--adapter-dir": "--adapter", "--adapter-path": "--adapter", "--lora-adapter": "--adapter",
    "--output": "--out", "--output-dir": "--out", "--out-dir": "--out", "--input": "--data", "--train-data": "--data",
    "--grad-clip": "--max-grad-norm", "--clip-grad": "--max-grad-norm", "--clip-grad-norm": "--max-grad-norm",
    "--lora-rank": "--lora-r", "--rank": "--lora-r", "--target-modules": "--lora-targets",
    "--lora-target-modules": "--lora-targets", "--precision": "--dtype", "--torch-dtype": "--dtype",
    "--random-seed": "--seed", "--learning-rate": "--lr", "--max-tokens": "--max-new-tokens",
    "--temp": "--temperature", "--api-base": "--base-url", "--endpoint": "--base-url", "--openai-api-key": "--api-key",
    "--restart": "--resume", "--continue": "--resume", "--force": "--overwrite", "--cache-path": "--cache",
    "--workers": "--concurrency", "--threads": "--concurrency", "--chat-template": "--template",
    # this project's own earlier spellings: hidden aliases for one release, never shown
    "--merge": "--save-merged", "--batch-prompts": "--batch-size", "--micro-prompts": "--micro-batch-size",
    "--context": "--max-len", "--prompts": "--data", "--cases": "--data", "--n": "--limit",
    "--llm-model": "--llm-model-name", "--slots": "--batch-size", "--max-retries": "--attempts",
    "--judge-max-tokens": "--judge-max-new-tokens", "--patient-max-tokens": "--patient-max-new-tokens",
}
MAX_LINES = 700


# ----------------------------------------------------------------------------- imports

def package_imports():
    """{module: [(imported module, names, line)]} for every import of a nanohuatuo module, anywhere in the file,
    and {module: [(module, attribute, line)]} for `module._name` reached through an imported module."""
    imports, attributes = {}, {}
    for path in sorted(PKG.glob("*.py")):
        me = path.stem
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found, aliases = [], {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .x import a, b
                    found.append((node.module.split(".")[0], [a.name for a in node.names], node.lineno))
                elif node.level == 1:  # from . import x, y
                    for a in node.names:
                        found.append((a.name, [], node.lineno))
                        aliases[a.asname or a.name] = a.name
                elif node.module and node.module.split(".")[0] == "nanohuatuo":
                    parts = node.module.split(".")
                    if len(parts) > 1:
                        found.append((parts[1], [a.name for a in node.names], node.lineno))
                    else:
                        for a in node.names:
                            found.append((a.name, [], node.lineno))
                            aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "nanohuatuo" and len(parts) > 1:
                        found.append((parts[1], [], node.lineno))
        imports[me] = [(m, names, line) for m, names, line in found if (PKG / f"{m}.py").exists()]
        attributes[me] = [(aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
                          if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                          and n.attr.startswith("_") and not n.attr.startswith("__")]
    return imports, attributes


def test_every_module_has_a_layer():
    missing = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in LAYER_OF)
    assert not missing, f"modules in no layer (add them to LAYERS here and to the README's code map): {missing}"


def test_imports_go_down_and_stages_never_import_stages():
    imports, _ = package_imports()
    bad = []
    for me, found in imports.items():
        mine = LAYER_OF.get(me)
        for other, _, line in found:
            theirs = LAYER_OF.get(other)
            if mine is None or theirs is None or other == me:
                continue
            if ORDER.index(theirs) > ORDER.index(mine):
                bad.append(f"nanohuatuo/{me}.py:{line}: {mine} module imports {other} ({theirs} layer, above it)")
            elif mine == theirs == "stages":
                bad.append(f"nanohuatuo/{me}.py:{line}: stage imports another stage, {other}; move what both need "
                           f"to the shared layer")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module():
    imports, attributes = package_imports()
    bad = [f"nanohuatuo/{me}.py:{line}: imports {n} from {other}"
           for me, found in imports.items() for other, names, line in found
           for n in names if n.startswith("_") and not n.startswith("__")]
    bad += [f"nanohuatuo/{me}.py:{line}: uses {other}.{attr}" for me, found in attributes.items()
            for other, attr, line in found if other != me]
    assert not bad, "private names used from another module (make them public or move the code):\n" + "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's first appearance in a depth-first walk (enough to name each offender)."""
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_find_cycles_by_hand():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    imports, _ = package_imports()
    graph = {me: {other for other, _, _ in found if other != me} for me, found in imports.items()}
    graph["__init__"] = set()  # importing nanohuatuo.x runs __init__ first whatever it imports: not an edge back
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-local imports included):\n" + \
        "\n".join(" -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------- command lines

HELP_RUNNER = r"""
import contextlib, io, json, re, runpy, sys
sys.path.insert(0, sys.argv[1])
def run(kind, target, args):
    buf = io.StringIO()
    old = sys.argv
    sys.argv = [target] + args
    code = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if kind == "script":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code, _ = 1, buf.write(f"{type(e).__name__}: {e}")
    finally:
        sys.argv = old
    return code, buf.getvalue()
out = {}
for kind, target in json.loads(sys.argv[2]):
    todo = [[]]
    while todo:
        sub = todo.pop(0)
        code, text = run(kind, target, sub + ["--help"])
        out[" ".join([target] + sub)] = [code, text]
        usage = re.sub(r"--[\w-]+ \{[^}]*\}", "", text.split("\n\n")[0])  # a flag's choices are no subcommands
        m = re.search(r"\{([\w,-]+)\}", usage) if not sub else None
        if code == 0 and m:
            todo += [[s] for s in m.group(1).split(",")]
print("\0" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    """{command: (exit code, --help output)} of every script and `python -m nanohuatuo.X`, with subcommands."""
    targets = [["script", str(ROOT / s)] for s in SCRIPTS if (ROOT / s).exists()]
    targets += [["module", f"nanohuatuo.{p.stem}"] for p in sorted(PKG.glob("*.py"))
                if '__name__ == "__main__"' in p.read_text(encoding="utf-8")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", HELP_RUNNER, str(ROOT), json.dumps(targets)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=ROOT)
    assert "\0" in r.stdout, r.stderr[-3000:]
    return {k.replace(str(ROOT) + "/", ""): tuple(v) for k, v in json.loads(r.stdout.split("\0")[-1]).items()}


def options(text: str) -> list[tuple[list[str], str]]:
    """(flag names, help text) of each option in argparse --help output."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line in ("positional arguments:", "options:",
                                                                  "optional arguments:")), len(lines))
    out = []
    for i, line in enumerate(lines):
        if i < start or not re.match(r"^  -", line):  # the description may quote flags too
            continue
        invocation, _, help = line.strip().partition("  ")
        following = []
        for nxt in lines[i + 1:]:  # a long invocation puts its help on the next, deeper-indented lines
            if re.match(r"^\s{4,}\S", nxt) and not re.match(r"^\s+-", nxt):
                following.append(nxt.strip())
            else:
                break
        flags = re.findall(r"(--?[\w-]+)", invocation.split(" ")[0] + " " + " ".join(
            p.split(" ")[0] for p in invocation.split(", ")))
        out.append((sorted(set(flags)), " ".join([help.strip()] + following).strip()))
    return out


def test_options_parser_by_hand():
    text = ("usage: x\n\n  --not-a-flag in the description\n\noptions:\n  -h, --help            show this help message and exit\n"
            "  --lora-targets NAME [NAME ...]\n                        LoRA targets (default: all)\n"
            "  --seed SEED\n  --out OUT             output directory\n")
    assert options(text) == [(["--help", "-h"], "show this help message and exit"),
                             (["--lora-targets"], "LoRA targets (default: all)"), (["--seed"], ""),
                             (["--out"], "output directory")]


def test_every_command_answers_help(helps):
    broken = {cmd: text[-500:] for cmd, (code, text) in helps.items() if code != 0 or "usage:" not in text}
    assert not broken, "commands whose --help fails:\n" + "\n".join(f"{c}: {t}" for c, t in broken.items())


def test_every_flag_has_help_and_one_name_per_concept(helps):
    bad = []
    for cmd, (code, text) in sorted(helps.items()):
        for flags, help in options(text):
            if not help:
                bad.append(f"{cmd}: {'/'.join(flags)} has no help text")
            for f in flags:
                if f in SYNONYMS:
                    bad.append(f"{cmd}: {f} is spelled {SYNONYMS[f]} everywhere else")
                if "_" in f:
                    bad.append(f"{cmd}: {f}: flags use dashes ({f.replace('_', '-')})")
            if "--seed" in flags and not re.search(r"default:? 0\b", help):
                bad.append(f"{cmd}: --seed should default to 0 like every other command ({help!r})")
    assert not bad, "\n".join(bad)


def test_the_llm_only_commands_start_without_torch():
    # distill, feedback and evaluate with endpoints only call an LLM endpoint; the README says they need no torch
    code = ("import sys, nanohuatuo, nanohuatuo.distill, nanohuatuo.feedback, nanohuatuo.evaluate, nanohuatuo.prepare; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr


# ----------------------------------------------------------------------------- the vocabulary

SFT, RM, PPO, DPO, GRPO = "train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py", "train_grpo.py"
SAMPLE, RANK = "nanohuatuo.sampling", "nanohuatuo.feedback rank"
EVAL = ["evaluate.py pairwise", "evaluate.py dialogue", "evaluate.py metrics"]
DISTILL = ["distill.py instructions", "distill.py conversations", "distill.py polish"]
TRAIN = [SFT, RM, PPO, DPO, GRPO]
DATA = ["data.py convert", "data.py mix", "data.py prompts", "data.py stats"]
# concept: (its one flag, a pattern of the help texts that describe it, the commands that take the flag).
# The README's "Flags" table shows the same rows.
VOCABULARY = {
    "model directory": ("--model", r"(?<!reward )(?<!from the )\bmodel directory", TRAIN + [SAMPLE, "chat.py", "serve.py",
                                                                          "demo.py", "evaluate.py metrics"]),
    "LoRA adapter on the model": ("--adapter", r"LoRA adapter (directory|on --model)",
                                  [RM, PPO, DPO, GRPO, SAMPLE, "chat.py", "serve.py", "evaluate.py metrics"]),
    "chat template": ("--template", r"^chat template", TRAIN + [SAMPLE, "chat.py", "serve.py", "evaluate.py metrics"]),
    "the stage's input file(s)": ("--data", None, TRAIN + [SAMPLE, RANK, *EVAL, *DISTILL[1:], *DATA]),
    "output directory or file": ("--out", None, TRAIN + [SAMPLE, RANK, *EVAL, *DISTILL, "demo.py", *DATA[:3]]),
    "device": ("--device", r"^auto \(cuda if available\)", TRAIN + [SAMPLE, "chat.py", "serve.py", "demo.py", *EVAL]),
    "dtype": ("--dtype", r"auto \(bfloat16 (autocast )?on CUDA", TRAIN + [SAMPLE, "chat.py", "serve.py", "demo.py",
                                                                      *EVAL]),
    "random seed": ("--seed", r"\bseed\b(?! instructions)", TRAIN + [SAMPLE, RANK, "chat.py", "demo.py", *EVAL,
                                                                    *DISTILL]),
    "continue a run": ("--resume", r"continue the interrupted run", TRAIN + EVAL),
    "start again": ("--overwrite", r"delete what --out holds", TRAIN + EVAL),
    "LoRA rank": ("--lora-r", r"LoRA rank|rank of the PPO LoRA", TRAIN),
    "LoRA alpha": ("--lora-alpha", r"LoRA alpha", TRAIN),
    "LoRA dropout (PPO has none)": ("--lora-dropout", r"dropout on the LoRA", [SFT, RM]),
    "LoRA target modules": ("--lora-targets", r"LoRA target modules", TRAIN),
    "learning rate": ("--lr", r"^(peak )?learning rate|^learning rate", TRAIN),
    "optimizer steps": ("--max-steps", r"optimizer steps in all|^PPO steps", TRAIN),
    "batch per step, or sequences decoded together": (
        "--batch-size", r"per optimizer step|per step, over|sequences decoded together",
        TRAIN + [SAMPLE, "serve.py", *EVAL]),
    "rows per forward/backward": ("--micro-batch-size", r"per forward", TRAIN),
    "gradient clipping": ("--max-grad-norm", r"gradient norm", TRAIN),
    "activation recomputation": ("--grad-checkpointing", r"recompute each block", TRAIN),
    "stop as if interrupted": ("--stop-after", r"as if interrupted", TRAIN),
    "checkpoint interval": ("--save-every", r"^checkpoint every", TRAIN),
    "checkpoints kept": ("--keep-checkpoints", r"^checkpoints kept", TRAIN),
    "weight quantisation (int8, NF4; a frozen NF4 base for QLoRA)": (
        "--quant", r"^(\w+ )*frozen base|NF4|^weight quantisation", TRAIN + ["chat.py", "serve.py", EVAL[2]]),
    "experiment trackers": ("--report-to", r"tensorboard", TRAIN),
    "flag values from a file": ("--config", r"read flag values from", TRAIN + [SAMPLE, RANK, "chat.py", "serve.py",
                                                                        "demo.py", *EVAL, *DISTILL]),
    "merged full model": ("--save-merged", r"\bmerged (full )?model|adapters folded in", [SFT, PPO, DPO, GRPO]),
    "tokens of prompt plus answer": ("--max-len", r"prompt \+ answer|prompt plus answer|history plus answer|"
                                                  r"tokens per conversation", [SFT, RM, SAMPLE, "chat.py", "serve.py"]),
    "new tokens per answer": ("--max-new-tokens", r"answer length limit|new tokens (in|per) (one )?answer|"
                                                  r"tokens (in|per) (one )?(answer|reply)|reply length limit",
                              [PPO, SAMPLE, "chat.py", *EVAL, *DISTILL]),
    "sampling temperature": ("--temperature", r"^(\w+: )?sampling temperature",
                             [PPO, SAMPLE, "chat.py", *EVAL, *DISTILL]),
    "nucleus sampling": ("--top-p", r"nucleus sampling", [SAMPLE, "chat.py", *EVAL]),
    "top-k sampling": ("--top-k", r"top-k sampling|k likeliest tokens", [SAMPLE, "chat.py", *EVAL]),
    "answers per prompt": ("--k", r"answers per prompt", [SAMPLE]),
    "how many items": ("--limit", r"first N|instructions to keep|stop after this many rows",
                       [SAMPLE, *EVAL, *DISTILL, "evaluate.py sheet", "data.py convert"]),
    "endpoint URL (of a role)": ("--base-url", r"OpenAI-compatible endpoint", [SAMPLE, "evaluate.py metrics"]),
    "model name at the endpoint (of a role)": ("--model-name", r"model name at|model the endpoint serves|"
                                                               r"agent's model", [SAMPLE, "evaluate.py metrics"]),
    "API key of the endpoint (of a role)": ("--api-key", r"\bAPI key\b", [SAMPLE, "evaluate.py metrics"]),
    "the model name a server advertises": ("--served-model-name", r"advertises", ["serve.py"]),
    "who judges": ("--judge", r"^who (judges|ranks)", [RANK, *EVAL[:2]]),
    "asks per item before unusable": ("--attempts", r"asks per item", [RANK, *DISTILL]),
    "requests in flight": ("--concurrency", r"in flight", [SAMPLE, RANK, *EVAL, *DISTILL]),
    "reply cache": ("--cache", r"SQLite (reply )?caches?\b", [SAMPLE, RANK, *EVAL, *DISTILL]),
}
# a role in front of a concept's flag: --judge-base-url, --a-model, --reward-template, --value-lr, ...
ROLE = r"--(?:[a-z0-9]+-)*"


def visible(helps):
    """{command: {flag: help}} of every command's --help, `python -m` twins of the scripts left out."""
    twins = {f"nanohuatuo.{m}": s for m, s in (("sft", SFT), ("reward", RM), ("ppo", PPO), ("chat", "chat.py"),
                                                 ("serve", "serve.py"), ("evaluate", "evaluate.py"),
                                                 ("distill", "distill.py"), ("demo", "demo.py"),
                                                 ("prepare", "data.py"), ("data", "data.py"))}
    out = {}
    for cmd, (code, text) in helps.items():
        if cmd.split(" ")[0] in twins:
            continue
        out[cmd] = {f: help for flags, help in options(text) for f in flags if f.startswith("--") and f != "--help"}
    return out


def test_vocabulary_one_flag_per_concept(helps):
    flags_of = visible(helps)
    bad = []
    for concept, (flag, pattern, takers) in VOCABULARY.items():
        for cmd in takers:
            if flag not in flags_of.get(cmd, {}):
                bad.append(f"{cmd}: takes no {flag} ({concept})")
        if pattern is None:
            continue
        for cmd, flags in sorted(flags_of.items()):
            for f, help in flags.items():
                if re.search(pattern, help) and not re.fullmatch(ROLE + re.escape(flag[2:]), f) \
                        and not any(re.fullmatch(ROLE + re.escape(other[2:]), f) and re.search(p or "$^", help)
                                    for other, p, _ in VOCABULARY.values() if other != flag):
                    bad.append(f"{cmd}: {f} ({help[:60]!r}) describes {concept!r}: name it {flag} (after a role)")
    assert not bad, "\n".join(bad)


def test_readme_flag_table_is_the_vocabulary():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f"{concept} -> {flag}" for concept, (flag, _, _) in VOCABULARY.items()
               if not re.search(rf"^\| {re.escape(concept)} \| `{re.escape(flag)}`", readme, re.M)]
    assert not missing, "README's flag table lacks (or misnames) these rows:\n" + "\n".join(missing)


def test_no_module_over_700_lines():
    long = {p.name: n for p in sorted(PKG.glob("*.py")) if (n := len(p.read_text(encoding="utf-8").splitlines()))
            > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along a real seam): {long}"
