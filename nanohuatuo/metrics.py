"""Progress, metrics and plots for every long job: one JSONL line per step, a PNG one call away.

    log = MetricsLog(out_dir / "metrics.jsonl", total_steps=1000, report_to=cfg.report_to)
    log.write(step=1, loss=2.3, lr=1e-4, tokens=4096)   # prints a progress line, appends JSONL
    log.table("samples", ["prompt", "response"], rows, step=1)   # to the trackers that have tables
    log.close()
    plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png", ["loss", "eval_loss"])
    plot_wtl(out_dir / "winrate.png", stats, "A vs B")   # win / tie / loss bars of an evaluation

Trackers: `report_to` names experiment trackers (tensorboard, trackio, wandb) that receive every
row MetricsLog writes, as well as, never instead of, metrics.jsonl and the PNGs. This is the one
hook: a training stage declares `report_to: list[str] = arg([], REPORT_TO_HELP, ...)` and passes it
to its MetricsLog. Each tracker's package is imported only when named, and a missing one is a
one-line error naming the extra to install (`pip install -e ".[wandb]"`); `check_report_to` says
so before a run spends minutes loading a model.
"""

import json
import math
import os
import platform
import sys
import time


REPORT_TO_HELP = ("also send the metrics to these trackers: tensorboard, trackio, wandb (pip install -e "
                  "'.[NAME]'); metrics.jsonl and the plots are written either way")


class Tracker:
    """One experiment tracker: numbers per step, and tables where the tracker has them."""

    def __init__(self, name, module, out_dir, run_name, config):
        self.name, self.module = name, module
        if name == "tensorboard":  # torch's writer; tensorboard has no tables, so they go as markdown text
            self.run = module.SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
        else:  # wandb, and trackio (wandb's calls, stored locally): the module-level calls both have
            project = os.environ.get(f"{name.upper()}_PROJECT") or "nanohuatuo"
            extra = {"dir": out_dir} if name == "wandb" else {}
            self.run = module.init(project=project, name=run_name, config=config, **extra)

    def log(self, step, values):
        if self.name == "tensorboard":
            for k, v in values.items():
                self.run.add_scalar(k, v, step)
            self.run.flush()  # a crash must not lose the steps since the writer's last flush
        else:
            self.module.log(values, step=step)

    def table(self, name, columns, rows, step):
        if self.name == "tensorboard":
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            self.run.add_text(name, "\n".join(lines), step)
            self.run.flush()
        elif hasattr(self.module, "Table"):
            self.module.log({name: self.module.Table(columns=list(columns), data=[list(r) for r in rows])},
                            step=step)

    def close(self):
        (self.run.close if self.name == "tensorboard" else self.module.finish)()


TRACKERS = {"tensorboard": "torch.utils.tensorboard", "trackio": "trackio", "wandb": "wandb"}  # name -> module


def check_report_to(names) -> list:
    """The tracker modules for `names`, imported; ValueError (one line) for an unknown name or a
    package that is not installed, naming the extra that installs it."""
    import importlib
    modules = []
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--report-to {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        try:
            modules.append(importlib.import_module(TRACKERS[name]))
        except ImportError as e:
            raise ValueError(f"--report-to {name} needs a package that is not installed ({e.name or e}): "
                             f"pip install -e '.[{name}]'") from None
    return modules


class MetricsLog:
    """Appends metrics rows to a JSONL file and prints step, values, tokens/s and ETA; forwards
    each row to the trackers named in `report_to` (config: the run's settings, which they record).

    Opening in append mode keeps the rows of an interrupted run; a resumed run continues the file.
    """

    def __init__(self, path, total_steps=None, print_every=1, stream=sys.stdout, report_to=(), config=None):
        self.path = str(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.total_steps = total_steps
        self.print_every = print_every
        self.stream = stream
        self.t0 = time.time()
        self.first_step = None
        self.tokens = 0
        out_dir = os.path.dirname(os.path.abspath(self.path))
        self.trackers = [Tracker(name, module, out_dir, os.path.basename(out_dir), config)
                         for name, module in zip(report_to, check_report_to(report_to))]

    def write(self, step, **values):
        now = time.time()
        if self.first_step is None:
            self.first_step = step - 1  # a resumed run measures speed from where it resumed
        self.tokens += values.pop("tokens", 0) or 0
        elapsed = now - self.t0
        row = {"step": step, **{k: v.item() if hasattr(v, "item") else v for k, v in values.items()},
               "time": round(now, 3)}
        if self.tokens:
            row["tokens_per_s"] = round(self.tokens / max(elapsed, 1e-9), 1)
        with open(self.path, "a") as f:  # strict JSON: a NaN or an infinity is written as the string "nan", "inf"
            f.write(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        if self.stream is not None and (step % self.print_every == 0 or step == self.total_steps):
            self.stream.write(self.format(step, row, elapsed) + "\n")
            self.stream.flush()
        numbers = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for t in self.trackers:
            t.log(step, numbers)
        return row

    def table(self, name, columns, rows, step):
        """Rows of text and numbers (PPO's sample answers) to every tracker that shows tables."""
        for t in self.trackers:
            t.table(name, columns, rows, step)

    def close(self):
        for t in self.trackers:
            t.close()
        self.trackers = []

    def format(self, step, row, elapsed):
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        for k, v in row.items():
            if k in ("step", "time", "tokens_per_s"):
                continue
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        if "tokens_per_s" in row:
            parts.append(f"{row['tokens_per_s']:.0f} tok/s")
        done = step - (self.first_step or 0)
        if self.total_steps and done > 0:
            eta = elapsed / done * (self.total_steps - step)
            parts.append(f"eta {_hms(eta)}")
        return " | ".join(parts)


def _plain(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def strict_json(obj):
    """obj with every NaN or infinity, however deep, as the string "nan", "inf" (as metrics.jsonl writes them):
    json.dump would write a bare NaN, which strict JSON readers refuse."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return _plain(obj)


def _hms(seconds):
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_metrics(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_metrics(jsonl_path, png_path, keys, title=None, x="step"):
    """One panel per key (rows lacking a key are skipped), written to png_path. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(jsonl_path)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        raise ValueError(f"{jsonl_path}: none of the requested metrics were logged")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r[x], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and x in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = str(png_path) + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


GROUP_EN = {  # plot labels where no CJK font is installed
    "病情诊断": "diagnosis", "病因分析": "cause", "治疗方案": "treatment", "就医建议": "where to seek care",
    "指标解读": "test results", "疾病表述": "disease description", "后果表述": "consequences",
    "注意事项": "precautions", "功效作用": "effects of drugs", "医疗费用": "costs",
    "皮肤科": "dermatology", "儿科": "pediatrics", "骨科": "orthopedics", "泌尿外科": "urology",
    "内科": "internal medicine", "妇科": "gynecology", "妇产科": "obstetrics & gynecology",
    "皮肤性病科": "dermatovenereology", "中医科": "Chinese medicine", "眼科": "ophthalmology",
    "消化内科": "gastroenterology", "产科": "obstetrics", "外科": "surgery", "神经内科": "neurology",
    "神经外科": "neurosurgery", "口腔科": "stomatology", "精神科": "psychiatry", "心血管内科": "cardiology",
    "普外科": "general surgery", "男科": "andrology",
}
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC")


def cjk_fonts() -> list[str]:
    """The fonts of CJK_FONTS that matplotlib finds installed, in order of preference."""
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return [f for f in CJK_FONTS if f in installed]


def plot_wtl(path, stats: dict, title: str) -> None:
    """Horizontal stacked bars of win / tie / loss (%), overall first, then each group.

    stats: {"overall": s, "groups": {name: s}}, each s with n, win_pct, tie_pct, loss_pct (winrate.tables).
    Group names are drawn in a CJK font when one is installed, else in English (GROUP_EN)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows = [("overall", stats["overall"])] + list(stats["groups"].items())
    rows = [(name, s) for name, s in rows if s.get("n")]
    if not rows:
        return
    cjk = cjk_fonts()
    if cjk:
        plt.rcParams["font.sans-serif"] = cjk + list(plt.rcParams["font.sans-serif"])

    def label(name):
        if cjk or name.isascii():
            return name
        return GROUP_EN.get(name, f"group {[n for n, _ in rows].index(name)}")
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    names = [f"{label(name)} (n={s['n']})" for name, s in rows][::-1]
    left = np.zeros(len(rows))
    for key, color, legend in (("win_pct", "#4c9a5b", "win"), ("tie_pct", "#b8b8b8", "tie"),
                               ("loss_pct", "#c8524b", "loss")):
        vals = np.array([s[key] for _, s in rows][::-1])
        ax.barh(names, vals, left=left, color=color, label=legend)
        for y, (x0, v) in enumerate(zip(left, vals)):
            if v >= 8:
                ax.text(x0 + v / 2, y, f"{v:.0f}", ha="center", va="center", fontsize=8)
        left += vals
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of judged pairs")
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.06), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    """The processor's model name, as `lscpu` prints it: every timing is reported with it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"
