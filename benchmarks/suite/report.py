"""The suite's BENCHMARKS.md sections and PNG plots, written only from measured results.

Three sections per preset (their titles carry the preset and the data set, so ``--quick`` and full runs coexist):
teachers and techniques (mean ± std per width, paired differences per seed, step-time ratios), peers (our LSQ QAT
beside Brevitas / NNCF / torch.ao, seed by seed), and paper vs here (each seed paper's headline claim, our closest
measurement, and whether its direction is reproduced by the criterion stated in the row).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.suite.config import ROOT, Settings
from benchmarks.suite.methods import COMPARISONS, METHODS


@dataclass
class RunInfo:
    settings: Settings
    argv: list[str]
    accelerator: str
    minutes: float
    fit_minutes: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.settings.name}, {self.settings.dataset}"

    @property
    def slug(self) -> str:
        return f"{self.settings.name}_{self.settings.dataset}"


# Each seed paper's headline claim and the suite's comparison that tests its direction: (technique, paper, claim,
# (method, baseline), criterion on the paired difference method - baseline in points).
PAPER_CLAIMS = (
    ("Block replacement", "Yu et al., arXiv:2412.15846",
     "training the low-precision blocks inside the full-precision model improves low-bit QAT over plain QAT",
     ("QAT + BR", "LSQ QAT"), "ahead"),
    ("QBitOpt", "Peters et al., ICCV-W 2023",
     "reallocating widths during QAT beats a fixed allocation at the same average bits",
     ("QAT + QBitOpt", "LSQ QAT"), "ahead"),
    ("FAT", "Goncharenko et al., arXiv:1812.07872",
     "tuning the thresholds by label-free distillation recovers accuracy that plain calibration loses",
     ("FAT", "PTQ (min/max)"), "ahead"),
    ("ZS-CGAN", "Choi et al., arXiv:2210.14392",
     "QAT on generated data, with no real image, comes close to QAT on the real data",
     ("QAT + KD (ZS-CGAN data)", "QAT + KD (real data)"), "within 1 point"),
)  # fmt: skip
# the seed papers the suite does not re-measure itself: (technique, paper, claim, the section that measures it, script)
SCRIPT_CLAIMS = (
    ("OMPQ", "Ma et al., AAAI 2023",
     "a one-batch orthogonality allocation matches searched mixed precision in seconds",
     "OMPQ: bit allocation from network orthogonality", "ompq.py"),
    ("Kernel quantization", "Yu et al., arXiv:2003.05148",
     "kernel codebooks reach 1-2 bits per conv parameter with little accuracy loss",
     "Kernel quantization (KQ)", "kernel_quantization.py"),
    ("SLQ / MLQ", "Xu et al., AAAI 2018",
     "incremental clustering-based quantization beats INQ's power-of-two codebook at low bits",
     "Incremental quantization (SLQ / MLQ)", "incremental_quantization.py"),
    ("BOMP-NAS", "van Son et al., arXiv:2301.11810",
     "Bayesian optimisation with QAT in the loop finds smaller models from a 6x shorter search",
     "Mixed-precision search (BOMP-NAS)", "mixed_precision_search.py"),
    ("AutoQB", "Lou et al., arXiv:1902.05690",
     "channel-level RL allocation beats layer-level (HAQ) at the same cost",
     "AutoQB: channel-level vs layer-level RL bit allocation", "autoqb.py"),
)  # fmt: skip


def _pct(values: Sequence[float]) -> str:
    values = [100 * v for v in values]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _select(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def paired(rows: list[dict], model: str, bits: int, method: str, baseline: str) -> list[float]:
    """``method`` minus ``baseline`` test accuracy in points, seed by seed (pairs with both rows only)."""
    base = {r["seed"]: r["accuracy"] for r in _select(rows, model=model, bits=bits, method=baseline)}
    return [
        100 * (r["accuracy"] - base[r["seed"]])
        for r in sorted(_select(rows, model=model, bits=bits, method=method), key=lambda r: r["seed"])
        if r["seed"] in base
    ]


def verdict(diffs: Sequence[float], criterion: str) -> str:
    """Whether a claim's direction holds: ``ahead`` = mean > 0 and ahead on most seeds; ``within 1 point``."""
    if not diffs:
        return "not measured"
    mean = statistics.mean(diffs)
    if criterion == "within 1 point":
        return "yes" if mean >= -1.0 else "no"
    ahead = sum(d > 0 for d in diffs)
    if mean > 0 and ahead > len(diffs) / 2:
        return "yes"
    if mean < 0 and ahead < len(diffs) / 2:
        return "no"
    return "unclear (within seed noise)"


def _diff_cell(diffs: Sequence[float]) -> str:
    if not diffs:
        return "–"
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
    return f"{statistics.mean(diffs):+.2f} ± {std:.2f} ({per_seed}; ahead {sum(d > 0 for d in diffs)}/{len(diffs)})"


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _shown_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` without this machine's paths (cache, plots, output) and without ``--no-write``."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--output", "--cache-dir", "--plots-dir", "--data-root"):
            skip = "=" not in arg
            continue
        if name != "--no-write":
            shown.append(arg)
    return shown


def provenance(info: RunInfo) -> str:
    import lightning

    device = torch.cuda.get_device_name(0) if info.accelerator == "gpu" else f"{os.cpu_count()} CPU cores"
    command = "python -m benchmarks " + shlex.join(_shown_arguments(info.argv))
    s = info.settings
    return (
        f"Run {dt.date.today().isoformat()} on {platform.platform()} ({device}, {torch.get_num_threads()} torch "
        f"threads), Python {platform.python_version()}, torch {torch.__version__}, Lightning {lightning.__version__}, "
        f"lightning-quant {_git_revision()}; the fits shown took {info.fit_minutes:.0f} min in all (each timed when "
        f"it ran; cached runs are not re-trained), this invocation {info.minutes:.0f} min. "
        f"Data: {s.dataset}" + (f" ({s.train_subset} training images)" if s.train_subset else "") + f"; "
        f"fine-tunes: {s.qat_epochs} epoch(s), Adam {s.qat_lr:g}, cosine; ZS-CGAN generator: "
        f"{s.generator_steps} steps; "
        f"{s.seeds} seed(s) per setting. "
        f"Command: `{command}`."
    )


def teachers_table(teachers: dict) -> list[str]:
    lines = [
        "| model | float epochs | test accuracy (%) | target (%) | converged | training time |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for t in teachers.values():
        lines.append(
            f"| {t.model} | {t.epochs} | {100 * t.accuracy:.2f} | {100 * t.target:.1f} | "
            f"{'yes' if t.converged else '**no**: figures below are judged against an undertrained teacher'} | "
            f"{t.seconds:.0f} s{' (cached)' if t.cached else ''} |"
        )
    return lines


def techniques_section(info: RunInfo, teachers: dict, rows: list[dict], plots: dict[str, str]) -> str:
    s = info.settings
    lines = [f"## Suite ({info.label}): teachers and techniques", "", provenance(info), "", *teachers_table(teachers)]
    for model in s.models:
        lines += [
            "",
            f"**{model}**, test accuracy (%), mean ± std over seeds (weights and inputs at the width, first and last "
            "layer 8-bit; every row from the same teacher, same epochs and data order per seed):",
            "",
            "| method | " + " | ".join(f"W{b}A{b}" for b in s.bits) + " | avg. weight bits |",
            "|---|" + "---:|" * len(s.bits) + "---|",
        ]
        for method in METHODS:
            cells = [_pct([r["accuracy"] for r in _select(rows, model=model, method=method, bits=b)]) for b in s.bits]
            avg = sorted(
                {
                    f"{r['avg_weight_bits']:.2f}"
                    for r in _select(rows, model=model, method=method)
                    if r["bits"] in s.bits
                }
            )
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {', '.join(avg) or '–'} |")
        lines += [
            "",
            "Paired differences (points; method − baseline, seed by seed on the same split and data order):",
            "",
            "| comparison | " + " | ".join(f"W{b}A{b}" for b in s.bits) + " |",
            "|---|" + "---|" * len(s.bits),
        ]
        for method, baseline in COMPARISONS:
            cells = [_diff_cell(paired(rows, model, b, method, baseline)) for b in s.bits]
            lines.append(f"| {method} − {baseline} | " + " | ".join(cells) + " |")
        ratios = step_ratios(rows, model)
        if ratios:
            lines += ["", "Training-step time / LSQ QAT's (median step, same width and seed, mean over them): "
                      + ", ".join(f"{m} {r:.2f}×" for m, r in ratios.items()) + "."]  # fmt: skip
    if "QAT + QBitOpt" in {r["method"] for r in rows}:
        lines += ["", "QBitOpt's allocations (weight bits per layer, seed 0) are in the plot below."]
    lines += ["", *(f"![{name}]({path})" for name, path in plots.items())]
    return "\n".join(lines)


def step_ratios(rows: list[dict], model: str) -> dict[str, float]:
    ratios: dict[str, list[float]] = {}
    for base in _select(rows, model=model, method="LSQ QAT"):
        for r in _select(rows, model=model, bits=base["bits"], seed=base["seed"]):
            if r["method"] != "LSQ QAT" and base["step_s"] > 0:
                ratios.setdefault(r["method"], []).append(r["step_s"] / base["step_s"])
    return {m: statistics.mean(v) for m, v in ratios.items()}


def peers_section(info: RunInfo, rows: list[dict], peer_rows: list[dict]) -> str:
    lines = [
        f"## Suite ({info.label}): peers",
        "",
        provenance(info),
        "",
        "Each peer's QAT from the same teacher, with the same model, data, widths (first and last layer 8-bit), "
        "epochs, optimizer and seeds as our LSQ QAT; test accuracy (%) per seed, and our lead (points) per seed.",
        "",
        "| model | peer (version) | W=A | peer, per seed | ours (LSQ QAT), per seed | ours − peer | note |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in _group_peers(peer_rows):
        ours = {o["seed"]: o["accuracy"] for o in _select(rows, model=r["model"], method="LSQ QAT", bits=r["bits"])}
        seeds = r["seeds"]
        peer = ", ".join("–" if a is None else f"{100 * a:.2f}" for a in r["accuracy"])
        mine = ", ".join(f"{100 * ours[s]:.2f}" if s in ours else "–" for s in seeds)
        diffs = [100 * (ours[s] - a) for s, a in zip(seeds, r["accuracy"], strict=True) if a is not None and s in ours]
        note = r["reason"] or r["note"] or ""
        lines.append(
            f"| {r['model']} | {r['peer']} ({r['version'] or 'not installed'}) | {r['bits']} | {peer} | {mine} | "
            f"{_diff_cell(diffs)} | {note} |"
        )
    return "\n".join(lines)


def _group_peers(peer_rows: list[dict]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for r in sorted(peer_rows, key=lambda r: (r["model"], r["peer"], -r["bits"], r["seed"])):
        g = groups.setdefault(
            (r["model"], r["peer"], r["bits"]),
            {"model": r["model"], "peer": r["peer"], "bits": r["bits"], "version": r.get("version"), "seeds": [],
             "accuracy": [], "reason": None, "note": r.get("note")},
        )  # fmt: skip
        g["seeds"].append(r["seed"])
        g["accuracy"].append(r.get("accuracy"))
        g["reason"] = g["reason"] or r.get("reason")
    return list(groups.values())


def papers_section(info: RunInfo, teachers: dict, rows: list[dict]) -> str:
    s = info.settings
    weak = [t.model for t in teachers.values() if not t.converged]
    lines = [
        f"## Suite ({info.label}): paper vs here",
        "",
        "Each seed paper's headline claim (from its abstract), the closest comparison this suite measures, and "
        'whether the claim\'s *direction* holds here, by the criterion in the row ("ahead": mean paired difference '
        "> 0 and ahead on most seeds). Our scale (MNIST-size models, short fine-tunes) is far from the papers' "
        '(CIFAR/ImageNet ResNets), so a "no" says what happens at this scale, not that the paper is wrong.'
        + (f" Teachers below target: {', '.join(weak)}." if weak else ""),
        "",
        "| technique (paper) | claim | our comparison | model, width: mean difference (points), verdict |",
        "|---|---|---|---|",
    ]
    for technique, paper, claim, (method, baseline), criterion in PAPER_CLAIMS:
        cells = []
        for model in s.models:
            for b in s.bits:
                diffs = paired(rows, model, b, method, baseline)
                if diffs:
                    cells.append(f"{model} W{b}A{b}: {statistics.mean(diffs):+.2f}, {verdict(diffs, criterion)}")
        lines.append(
            f"| {technique} ({paper}) | {claim} | {method} vs {baseline} ({criterion}) | "
            + ("; ".join(cells) or "not measured in this run")
            + " |"
        )
    for technique, paper, claim, section, script in SCRIPT_CLAIMS:
        name = script.removesuffix(".py")
        lines.append(
            f"| {technique} ({paper}) | {claim} | `benchmarks/{script}` (`python -m benchmarks run --only {name}`) | "
            f'in the section "{section}", with its own reading |'
        )
    return "\n".join(lines)


def plot_pareto(rows: list[dict], peer_rows: list[dict], models: Sequence[str], path: Path) -> Path:
    """Accuracy vs average weight bits: every method (mean ± std over seeds) and peer, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, method in enumerate(METHODS):
            points = _mean_points(_select(rows, model=model, method=method), "avg_weight_bits")
            if points:
                xs, ys, es = zip(*points, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="os^v<>Dp"[i % 8], capsize=3, label=method)
        avg_of = {r["bits"]: r["avg_weight_bits"] for r in _select(rows, model=model, method="LSQ QAT")}
        for g in _group_peers([r for r in peer_rows if r["model"] == model]):
            accs = [100 * a for a in g["accuracy"] if a is not None]
            if accs and g["bits"] in avg_of:
                ax.scatter([avg_of[g["bits"]]], [statistics.mean(accs)], marker="x", s=60,
                           label=f"{g['peer']} W{g['bits']}A{g['bits']}")  # fmt: skip
        ax.set(title=model, xlabel="average weight bits (parameter-weighted)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_points(rows: list[dict], x: str) -> list[tuple[float, float, float]]:
    by_bits: dict[int, list[dict]] = {}
    for r in rows:
        by_bits.setdefault(r["bits"], []).append(r)
    points = []
    for group in by_bits.values():
        accs = [100 * r["accuracy"] for r in group]
        points.append(
            (
                statistics.mean(r[x] for r in group),
                statistics.mean(accs),
                statistics.stdev(accs) if len(accs) > 1 else 0,
            )
        )
    return sorted(points)


def plot_allocations(rows: list[dict], models: Sequence[str], path: Path) -> Path | None:
    """QBitOpt's weight bits per layer (seed 0), one bar group per width, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = {
        m: sorted(_select(rows, model=m, method="QAT + QBitOpt", seed=0), key=lambda r: r["bits"]) for m in models
    }
    if not any(picked.values()):
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, r in enumerate(picked[model]):
            names = list(r["layer_bits"])
            width = 0.8 / len(picked[model])
            ax.bar([j + i * width for j in range(len(names))], [r["layer_bits"][n] for n in names], width,
                   label=f"average as uniform W{r['bits']}")  # fmt: skip
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"{model}: QBitOpt weight bits per layer", ylabel="weight bits")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_time(rows: list[dict], models: Sequence[str], path: Path) -> Path | None:
    """Training-step time of each method relative to LSQ QAT's, one bar group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {m: step_ratios(rows, m) for m in models}
    methods = [m for m in METHODS if any(m in r for r in ratios.values())]
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        ax.bar([j + i * width for j in range(len(methods))], [ratios[model].get(m, 0) for m in methods], width,
               label=model)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="median step time / LSQ QAT's", title="Training-step time relative to LSQ QAT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sections(
    info: RunInfo,
    teachers: dict,
    rows: list[dict],
    peer_rows: list[dict],
    parts: Sequence[str],
    plots_dir: Path,
    output: Path,
) -> list[tuple[str, str]]:
    """The (header, text) of every section the parts run produce; plots are written to ``plots_dir``."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    models = list(info.settings.models)

    def link(path: Path | None) -> str | None:
        return None if path is None else os.path.relpath(path, output.parent)

    out = []
    if {"teachers", "techniques"} & set(parts):
        plots = {}
        if rows:
            plots["accuracy vs average bits"] = link(
                plot_pareto(rows, peer_rows, models, plots_dir / f"pareto_{info.slug}.png")
            )
            plots["QBitOpt bits per layer"] = link(
                plot_allocations(rows, models, plots_dir / f"allocations_{info.slug}.png")
            )
            plots["step time"] = link(plot_step_time(rows, models, plots_dir / f"step_time_{info.slug}.png"))
        text = techniques_section(info, teachers, rows, {k: v for k, v in plots.items() if v})
        out.append((text.splitlines()[0], text))
    if "peers" in parts:
        text = peers_section(info, rows, peer_rows)
        out.append((text.splitlines()[0], text))
    if "papers" in parts:
        text = papers_section(info, teachers, rows)
        out.append((text.splitlines()[0], text))
    return out
