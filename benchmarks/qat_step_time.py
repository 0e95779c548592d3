"""Training-step time and memory of QAT on CPU: FP32 vs lightning-quant's LSQ QAT vs torch.ao eager-mode QAT.

One training step = forward + cross-entropy loss + backward + SGD step (momentum 0.9), on CIFAR-shaped
random data (``3x32x32``, 10 classes, fixed seed) through ResNet-20 (:func:`lightning_quant.models.resnet20`).
Every variant starts from the same float weights and sees the same batch.

Variants:

* ``FP32``: the float model.
* ``lightning-quant WbAb``: ``quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=b, act_bits=b)))``,
  i.e. the library defaults: LSQ learned step sizes, per-channel symmetric weights, asymmetric per-tensor
  inputs of every Conv/Linear, first and last layer at 8 bits (``first_last_bits=8``); one calibration
  forward (all quantizers observing, ``no_grad``) before timing, as the QAT callback does on its first batch.
  Its LSQ fake quantization runs through the fused compiled kernels of :mod:`lightning_quant.core.fused` (the
  library default; their compile and self-check happen in the first step, once per process).
* ``lightning-quant WbAb (LSQ, aten kernels)``: the same model with the fused path switched off
  (:func:`~lightning_quant.core.fused.fused_disabled`): aten's learnable fake-quant kernels, the path before the
  fused one; results are bit-identical, only the time differs. ``--no-aten-baseline`` leaves these lines out.
* ``torch.ao eager QAT (unfused)``: ``prepare_qat`` with ``get_default_qat_qconfig("x86")`` on the plain model:
  Conv/Linear become ``torch.ao.nn.qat`` modules (per-channel weight fake-quant) and fake-quant observers are
  attached to the *outputs* of every Conv, BatchNorm and Linear. Observers stay on (the torch.ao default until
  the user calls ``disable_observer``).
* ``torch.ao eager QAT (fused)``: ``fuse_modules_qat`` of conv+bn+relu / conv+bn first (what torch.ao's QAT
  tutorials do), then the same ``prepare_qat``: ``ConvBnReLU2d`` / ``ConvBn2d`` QAT modules with BN folded into
  the fake-quantized weight.

The torch.ao lines fake-quantize weights and module outputs but not the residual addition (that needs
``FloatFunctional``, plus ``QuantStub``/``DeQuantStub``, to be convertible to a real int8 model); for the
*training step time* they are the comparable line. torch.ao is deprecated (it warns on use); if it fails, the
failure is reported in the table instead of a time.

Timing is robust to other processes on the machine: the variants are interleaved round-robin (each round runs
one step of every variant, in an order rotated every round), so background load hits all variants alike, and
the report gives medians, plus the median of the per-round ratios to FP32. Contention on a 2-core machine is
bursty and severe (a 2-thread step sharing its cores with another busy process takes 10-30x longer), so before
each round the script waits until other processes use at most ``--max-foreign`` of the machine (measured from
``/proc/stat`` minus this process's own CPU time), and only *clean* rounds enter the statistics: other processes
stayed below that during every step, and no step exceeded ``--clean-factor`` times that variant's fastest quiet
step. It times until ``--steps`` clean rounds (or ``--max-rounds`` / ``--max-minutes``); without ``/proc`` only
the second test applies. Beside wall time it records the process's CPU time per step (``time.process_time``, all
threads): other processes disturb it far less, so its per-round ratio is the more robust figure on a busy machine.

Memory, measured after the timing on one more step of every variant (gradients set to ``None`` first, as every
step does): *peak step memory* is the highest total of bytes that torch's CPU allocator handed out during the step
and had not yet freed, counted from the step's start -- activations, saved tensors, gradients and temporaries;
parameters and optimizer state allocated before the step are not in it (from ``torch.profiler``'s allocation
events, ``profile_memory=True``). *Saved for backward* is the size of the distinct storages that autograd saved
for the backward pass in the step's forward (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded.
Both are given as bytes and as ratios to FP32. Process-level measures (RSS) are not used: the allocator keeps
freed memory, so they say little about one step.

Usage::

    python benchmarks/qat_step_time.py                       # defaults, updates BENCHMARKS.md
    python benchmarks/qat_step_time.py --steps 5 --no-write --json /tmp/qat.json
    python benchmarks/qat_step_time.py --profile             # also prints torch.profiler top ops

The command written into BENCHMARKS.md leaves out ``--json``, ``--output``, ``--no-write`` and ``--profile``,
which change where results go but no figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from common import torch_ao_prepare_qat  # benchmarks/common.py (the script's folder is on sys.path)
from torch import nn

from lightning_quant.core.fused import fused_disabled, fused_stats
from lightning_quant.models import resnet20
from lightning_quant.surgery import LayerSpec, QuantSpec, quantize_model, set_observing

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.3  # issue 21's target: our QAT step time <= 1.3x FP32

INTRO = """# Benchmarks

Every figure in this file is regenerated by a script in [`benchmarks/`](benchmarks/README.md); each section
names the exact command, the machine and the date it was measured on. Re-running a script rewrites only its
own section.
"""


@dataclass
class Variant:
    """One line of the table: a model with its optimizer, or the reason it could not be built."""

    name: str
    build: Callable[[], nn.Module]
    note: str = ""
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # CPU time of this process (all threads) per step
    # the context every step of this variant runs in (e.g. aten's fake-quant kernels instead of the fused ones)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    first_step_s: float | None = None
    memory: dict[str, float] = field(default_factory=dict)


# -- models ----------------------------------------------------------------------------------------------------
def _fp32(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base)


def _half_2_half_4_bits(base: nn.Module) -> dict[str, LayerSpec]:
    """Per-channel widths for every Conv/Linear: the first half of its output channels 2-bit, the rest 4-bit."""
    layers = {}
    for name, module in base.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            channels = module.weight.shape[0]
            widths = (2,) * (channels // 2) + (4,) * (channels - channels // 2)
            layers[name] = LayerSpec(weight_bits=widths, act_bits=4)
    return layers


def _ours(base: nn.Module, bits: int, x: torch.Tensor, mixed: bool = False) -> nn.Module:
    spec = QuantSpec(default=LayerSpec(weight_bits=bits, act_bits=bits))
    if mixed:  # every layer's widths given explicitly, the first and last layer included
        spec = QuantSpec(
            default=LayerSpec(weight_bits=4, act_bits=4), first_last_bits=None, layers=_half_2_half_4_bits(base)
        )
    model = quantize_model(copy.deepcopy(base), spec)
    # one calibration forward: every quantizer (weights and inputs) sets its step size from data
    set_observing(model, True)
    with torch.no_grad():
        model(x)
    set_observing(model, False)
    return model


def _summarise_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """Distinct warnings, first line only, with a count."""
    counts: dict[str, int] = {}
    for w in caught:
        key = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0].strip()}"
        key = re.sub(r"\s+", " ", key)
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} (x{n})" if n > 1 else k for k, n in counts.items()]


# -- timing ----------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def step(v: Variant, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step of ``v`` inside its context."""
    with v.context():
        train_step(v.model, v.optimizer, x, y)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def prepare(variants: list[Variant], x: torch.Tensor, y: torch.Tensor) -> None:
    """Build every variant and run one step on it; a variant that fails keeps its error and is skipped."""
    for v in variants:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                v.model = v.build().train()
                v.optimizer = make_optimizer(v.model)
                t0 = time.perf_counter()
                step(v, x, y)  # the first step compiles the fused kernels (once per process)
                v.first_step_s = time.perf_counter() - t0
            except Exception as exc:  # report any failure of a peer library honestly instead of crashing
                v.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                v.model = v.optimizer = None
        v.warnings = _summarise_warnings(caught)


def measure_memory(v: Variant, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Peak bytes allocated during one step (from the step's start) and bytes saved for backward (see above)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    assert v.model is not None and v.optimizer is not None
    parameters = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with v.context():
        v.optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(v.model(x), y)
        loss.backward()
        v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)  # the profiled step starts with no gradients, like every step
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(v, x, y)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"peak_step_bytes": float(peak), "saved_for_backward_bytes": float(sum(saved.values()))}


class CpuProbe:
    """CPU time used by *other* processes, from ``/proc/stat`` minus this process's ``/proc/self/stat`` (Linux).

    ``foreign(a, b, wall)`` is the fraction of the machine (all CPUs) that other processes (and the hypervisor:
    steal time) used between two snapshots; 1.0 means every CPU was busy with something else. Clock ticks are
    1/100 s, so a 0.3 s step on 2 CPUs resolves to about 0.02.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1
        try:
            self.snapshot()
            self.available = True
        except (OSError, ValueError, IndexError):
            self.available = False

    @staticmethod
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime of all threads of this process
        return user + nice + system + irq + softirq + steal, own

    def foreign(self, a: tuple[int, int], b: tuple[int, int], wall: float) -> float:
        if not self.available:
            return 0.0
        other = (b[0] - a[0]) - (b[1] - a[1])
        return max(other, 0) / (max(wall, 1e-9) * self.hz * self.ncpu)

    def wait_until_quiet(self, limit: float, deadline: float) -> float:
        """Sleep until other processes use at most ``limit`` of the machine over 0.5 s; returns seconds waited."""
        start = time.monotonic()
        while self.available and time.monotonic() < deadline:
            a, t0 = self.snapshot(), time.perf_counter()
            time.sleep(0.5)
            if self.foreign(a, self.snapshot(), time.perf_counter() - t0) <= limit:
                break
            time.sleep(1.0)
        return time.monotonic() - start


def run_round(live: list[Variant], x: torch.Tensor, y: torch.Tensor, r: int, probe: CpuProbe) -> None:
    """One step of every variant, in an order rotated by ``r``; appends wall time, CPU time and foreign CPU load."""
    k = r % len(live)
    for v in live[k:] + live[:k]:
        a = probe.snapshot() if probe.available else (0, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        step(v, x, y)
        wall = time.perf_counter() - t0
        v.cpu_times.append(time.process_time() - c0)
        v.times.append(wall)
        v.foreign.append(probe.foreign(a, probe.snapshot(), wall) if probe.available else 0.0)


def clean_rounds(variants: list[Variant], factor: float, max_foreign: float) -> list[bool]:
    """Rounds in which, for every variant, other processes used at most ``max_foreign`` of the machine during the
    step and the step took at most ``factor`` times the variant's fastest such step."""
    live = [v for v in variants if v.error is None]
    n = len(live[0].times)
    quiet = [all(v.foreign[i] <= max_foreign for v in live) for i in range(n)]
    best = {}
    for v in live:
        pool = [t for t, ok in zip(v.times, quiet, strict=True) if ok] or v.times
        best[v.name] = min(pool)
    return [quiet[i] and all(v.times[i] <= factor * best[v.name] for v in live) for i in range(n)]


def measure(
    variants: list[Variant], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> tuple[list[bool], float]:
    """Warm up, then time rounds until ``args.steps`` clean rounds, ``args.max_rounds`` or the time budget.

    Before each round it waits (within the budget) until other processes leave the machine quiet. Returns the
    clean-round mask over the recorded rounds (see :func:`clean_rounds`) and the seconds spent waiting.
    """
    live = [v for v in variants if v.error is None]
    probe = CpuProbe()
    for r in range(args.warmup):
        run_round(live, x, y, r, probe)
        for v in live:
            v.times.clear()
            v.foreign.clear()
            v.cpu_times.clear()
    deadline = time.monotonic() + 60 * args.max_minutes
    waited = 0.0
    mask: list[bool] = []
    for r in range(args.max_rounds):
        waited += probe.wait_until_quiet(args.max_foreign, deadline)
        run_round(live, x, y, r, probe)
        mask = clean_rounds(variants, args.clean_factor, args.max_foreign)
        if sum(mask) >= args.steps or time.monotonic() > deadline:
            break
    return mask, waited


# -- report ----------------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict[str, str | int]:
    model_name, cores = platform.processor() or platform.machine(), os.cpu_count() or 0
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model_name = fields.get("Model name", model_name).strip()
        cores = int(fields.get("CPU(s)", cores))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    return {
        "cpu": model_name,
        "cpus": cores,
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
    }


def _stats(times: list[float], fp_times: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) >= 2 else (times[0],) * 3
    return {
        "median_s": statistics.median(times),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": min(times),
        "ratio_of_medians": statistics.median(times) / statistics.median(fp_times),
        "median_paired_ratio": statistics.median(a / b for a, b in zip(times, fp_times, strict=True)),
    }


def results(variants: list[Variant], mask: list[bool]) -> list[dict]:
    """Per-variant statistics over the clean rounds (all rounds when none was clean), and over all rounds."""
    fp = variants[0]
    use = mask if any(mask) else [True] * len(mask)
    rows = []
    for v in variants:
        row: dict = {"variant": v.name, "note": v.note, "warnings": v.warnings}
        if v.error is not None:
            row["error"] = v.error
        else:
            row["memory"] = v.memory
            row["first_step_s"] = v.first_step_s
            picked = [t for t, keep in zip(v.times, use, strict=True) if keep]
            fp_picked = [t for t, keep in zip(fp.times, use, strict=True) if keep]
            row |= _stats(picked, fp_picked)
            row["all_rounds"] = _stats(v.times, fp.times)
            cpu = [t for t, keep in zip(v.cpu_times, use, strict=True) if keep]
            fp_cpu = [t for t, keep in zip(fp.cpu_times, use, strict=True) if keep]
            row["cpu_time"] = _stats(cpu, fp_cpu)
            row["times_s"] = v.times
            row["cpu_times_s"] = v.cpu_times
            row["foreign_load"] = v.foreign
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | median s/step | IQR (s) | min s/step | × FP32 (median per-round ratio) "
        "| × FP32 (ratio of medians) | × FP32 (CPU time, median per-round ratio) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: `{r['error']}` | | | | | |")
        else:
            lines.append(
                f"| {r['variant']} | {r['median_s']:.3f} | {r['q1_s']:.3f}–{r['q3_s']:.3f} | {r['min_s']:.3f} "
                f"| **{r['median_paired_ratio']:.2f}** | {r['ratio_of_medians']:.2f} "
                f"| {r['cpu_time']['median_paired_ratio']:.2f} |"
            )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    fp = rows[0].get("memory")
    lines = [
        "| variant | peak step memory (MiB) | × FP32 | saved for backward (MiB) | × FP32 | first step (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.get("memory")
        if not m or not fp:
            continue
        peak, saved = m["peak_step_bytes"], m["saved_for_backward_bytes"]
        lines.append(
            f"| {r['variant']} | {peak / 2**20:.1f} | {peak / fp['peak_step_bytes']:.2f} | {saved / 2**20:.1f} "
            f"| {saved / fp['saved_for_backward_bytes']:.2f} | {r['first_step_s']:.1f} |"
        )
    return "\n".join(lines)


def fused_line(stats: dict) -> str:
    """One sentence on the fused kernels in this run: compile time, and fallbacks if any."""
    seconds = stats["compile_seconds"]
    if not seconds:
        return "The fused fake-quant kernels were not used in this run."
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    text = (
        f"Fused fake-quant kernels: compile + self-check against aten took {sum(seconds.values()):.1f} s in all "
        f"({parts}), inside the first step of the first lightning-quant line (later lines and processes reuse "
        "inductor's on-disk cache, so a second run compiles faster)."
    )
    # the aten-kernel lines switch the fused path off on purpose: only other reasons are fallbacks
    fallbacks = {k: n for k, n in stats["fallbacks"].items() if not k.startswith("disabled")}
    not_ok = {k: v for k, v in stats["ready"].items() if v != "ok"}
    if not_ok or fallbacks:
        text += f" Fallbacks to aten's kernels: {not_ok or ''} {fallbacks or ''}."
    return text


def contention_line(mask: list[bool], args: argparse.Namespace, waited: float) -> str:
    n_clean, n = sum(mask), len(mask)
    wait = f" Waited {waited:.0f} s in all for quiet before rounds." if waited >= 1 else ""
    if n_clean == 0:
        return f"No clean round among {n} timed: the statistics use all rounds and are dominated by contention.{wait}"
    if n_clean == n:
        return f"All {n} timed rounds were clean.{wait}"
    return (
        f"{n_clean} clean rounds of {n} timed; the other {n - n_clean} had another process busy during a step "
        f"(more than {args.max_foreign:g} of the machine) or a step slower than {args.clean_factor:g}x that "
        f"variant's fastest, and are left out of the statistics.{wait}"
    )


def section(
    args: argparse.Namespace,
    rows: list[dict],
    info: dict,
    command: str,
    load: tuple,
    mask: list[bool],
    waited: float,
    stats: dict,
) -> str:
    ours = [r for r in rows if r["variant"].startswith("lightning-quant") and "error" not in r]
    ours = [r for r in ours if "aten kernels" not in r["variant"]]
    verdict = ", ".join(
        f"{r['variant']} {r['median_paired_ratio']:.2f}x "
        f"({'meets it' if r['median_paired_ratio'] <= TARGET_RATIO else 'above it'})"
        for r in ours
    )
    method = (
        "One training step (forward + cross-entropy + backward + SGD step) of ResNet-20 on random CIFAR-shaped data "
        f"(`{args.batch_size}x3x32x32`, seed {args.seed}), after {args.warmup} warm-up round(s). The variants are "
        "interleaved round-robin (one step of each per round, order rotated every round), so load from other "
        "processes hits all of them alike. Contention on a small machine is bursty and severe (a 2-thread step that "
        "shares its cores with another busy process can take 10-30x longer), so each round first waits until other "
        f"processes use at most {args.max_foreign:g} of the machine (`/proc/stat`), and a round counts only if that "
        "stayed so during every step in it and every step is within "
        f"{args.clean_factor:g}x of that variant's fastest quiet step; timing continues until {args.steps} such rounds "
        f"(at most {args.max_rounds} rounds / {args.max_minutes:g} min). {contention_line(mask, args, waited)} "
        "The bold column is the median over the clean rounds of (variant "
        "step / FP32 step of the same round); the figures over all rounds are in the `--json` output. The last "
        "column is the same ratio of this process's CPU time (all threads, `time.process_time`), which other "
        "processes disturb much less than wall time (with 2 threads it also counts the threads' spin-waiting)."
    )
    machine = (
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} intra-op threads, "
        f"Python {info['python']}; measured {dt.date.today().isoformat()} (1-min load average {load[0]:.2f} before, "
        f"{load[1]:.2f} after)."
    )
    if not any(mask):
        verdict = "inconclusive, no clean round (the ratios above are dominated by contention)"
    target = f"Target (issue): lightning-quant QAT ≤ {TARGET_RATIO}x FP32 step time. This run: {verdict or 'n/a'}."
    notes = "\n".join(f"- **{r['variant']}**: {r['note']}" for r in rows if r["note"])
    warns = "\n".join(f"- {r['variant']}: " + "; ".join(f"`{w}`" for w in r["warnings"]) for r in rows if r["warnings"])
    parts = [
        f"## QAT step time (ResNet-20, batch {args.batch_size}, CPU)",
        textwrap.fill(method, 115),
        f"```\n{command}\n```",
        textwrap.fill(machine, 115),
        markdown_table(rows),
        textwrap.fill(target, 115),
        textwrap.fill(fused_line(stats), 115),
        textwrap.fill(
            "Memory (one more step of each variant after the timing; definitions in the script's docstring): peak "
            "step memory = the most bytes of CPU tensors allocated and not yet freed at any moment of a step, "
            "counted from its start (torch.profiler allocation events); saved for backward = distinct storages "
            "autograd kept for the backward pass, parameters excluded. First step = wall time of each variant's "
            "first step (compilation included where it happened).",
            115,
        ),
        memory_table(rows),
        "What each line measures:",
        notes,
        "Warnings raised while building and first stepping each variant:",
        warns or "- none",
    ]
    return "\n\n".join(parts) + "\n"


def update_markdown(path: Path, text: str) -> None:
    """Replace this script's section of ``path`` (or append it); create the file with its intro if needed."""
    heading = text.splitlines()[0]
    old = path.read_text() if path.exists() else INTRO
    pattern = re.compile(r"^## QAT step time \(ResNet-20, batch \d+, CPU\)\n.*?(?=^## |\Z)", re.M | re.S)
    same = [m for m in pattern.finditer(old) if m.group(0).splitlines()[0] == heading]
    if same:
        m = same[0]
        new = old[: m.start()] + text.rstrip() + "\n" + ("\n" if old[m.end() :] else "") + old[m.end() :]
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)


def profile(variants: list[Variant], x: torch.Tensor, y: torch.Tensor, steps: int = 3, top: int = 15) -> None:
    """Print torch.profiler's top operators (self CPU time) for each built variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for v in variants:
        if v.error is not None:
            continue
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(v, x, y)
        print(f"\n### profile: {v.name} ({steps} steps, self CPU time)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="clean timed rounds wanted (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="bit widths of our QAT lines (WbAb)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clean-factor",
        type=float,
        default=1.5,
        help="a clean round also has every variant's step within this factor of its own fastest quiet step",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="a clean round has other processes using at most this fraction of the machine during each step "
        "(from /proc/stat); rounds also wait for such quiet before they start",
    )
    p.add_argument("--max-rounds", type=int, default=None, help="stop after this many timed rounds (default 4x steps)")
    p.add_argument("--max-minutes", type=float, default=20.0, help="stop timing new rounds after this many minutes")
    p.add_argument("--no-torch-ao", action="store_true", help="skip the torch.ao eager-mode QAT lines")
    p.add_argument("--no-mixed", action="store_true", help="skip the per-channel mixed-width line")
    p.add_argument(
        "--no-aten-baseline",
        action="store_true",
        help="skip the lightning-quant lines that run aten's fake-quant kernels instead of the fused ones",
    )
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file whose section to update")
    p.add_argument("--no-write", action="store_true", help="do not update --output")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    p.add_argument("--from-json", type=Path, default=None, help="write the section from an earlier run's --json file")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops per variant afterwards")
    args = p.parse_args(argv)
    if args.max_rounds is None:
        args.max_rounds = 4 * args.steps
    if not 0 < args.max_foreign <= 1:
        p.error(f"--max-foreign must be in (0, 1], got {args.max_foreign}")
    if args.clean_factor <= 1:
        p.error(f"--clean-factor must be > 1, got {args.clean_factor}")
    for name in ("batch_size", "steps", "threads", "max_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def measurement_command(argv: list[str]) -> str:
    """The command line without the options that only choose where results go (they change no figure)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in ("--no-write", "--profile"):
            continue
        if name in ("--json", "--output"):
            skip = "=" not in token
            continue
        kept.append(token)
    return shlex.join(["python", "benchmarks/qat_step_time.py", *kept])


def write_from_json(path: Path, output: Path) -> None:
    """Rewrite the BENCHMARKS.md section from a ``--json`` file of an earlier run (no figure is measured again)."""
    payload = json.loads(path.read_text())
    config = dict(payload["config"])
    config["output"] = Path(config["output"])
    args = argparse.Namespace(**config)
    text = section(
        args,
        payload["results"],
        payload["machine"],
        payload["command"],
        tuple(payload["load_average"]),
        payload["clean_rounds"],
        payload["seconds_waited_for_quiet"],
        payload["fused"],
    )
    update_markdown(output, text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        write_from_json(args.from_json, args.output)
        print(f"updated {args.output} from {args.from_json}")
        return 0
    command = measurement_command(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = resnet20().train()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)

    variants = [Variant("FP32", lambda: _fp32(base), note="float ResNet-20, no quantizers.")]
    for b in args.bits:
        variants.append(
            Variant(
                f"lightning-quant W{b}A{b} (LSQ)",
                lambda b=b: _ours(base, b, x),
                note=(
                    f"`quantize_model(model, QuantSpec(default=LayerSpec(weight_bits={b}, act_bits={b})))`: LSQ "
                    "learned steps, per-channel weights, per-tensor asymmetric inputs of all 22 Conv/Linear layers, "
                    "first/last layer 8-bit; one calibration forward before timing. Fused fake-quant kernels "
                    "(the default)."
                ),
            )
        )
        if not args.no_aten_baseline:
            variants.append(
                Variant(
                    f"lightning-quant W{b}A{b} (LSQ, aten kernels)",
                    lambda b=b: _ours(base, b, x),
                    note=(
                        "the same model with the fused path off (`fused_disabled()`): aten's learnable fake-quant "
                        "kernels, the path before issue 21; bit-identical results."
                    ),
                    context=fused_disabled,
                )
            )
    if not args.no_mixed:
        variants.append(
            Variant(
                "lightning-quant W2/4A4 per-channel mixed (LSQ)",
                lambda: _ours(base, 4, x, mixed=True),
                note=(
                    "every Conv/Linear with one width per output channel: the first half of its channels 2-bit, the "
                    "rest 4-bit (two equal-width groups, one fake-quant kernel each), 4-bit inputs; fused kernels."
                ),
            )
        )
    if not args.no_torch_ao:
        variants += [
            Variant(
                "torch.ao eager QAT W8A8 (unfused)",
                lambda: torch_ao_prepare_qat(copy.deepcopy(base), fused=False),
                note=(
                    '`prepare_qat(model)` with `get_default_qat_qconfig("x86")` on the plain model: per-channel '
                    "weight fake-quant on the 22 Conv/Linear, `FusedMovingAvgObsFakeQuantize` on the outputs of "
                    "every Conv, BatchNorm and Linear (43), observers on; no QuantStub/FloatFunctional."
                ),
            ),
            Variant(
                "torch.ao eager QAT W8A8 (fused conv+bn(+relu))",
                lambda: torch_ao_prepare_qat(copy.deepcopy(base), fused=True),
                note=(
                    "`fuse_modules_qat` (conv+bn+relu, conv+bn, shortcut conv+bn), then the same `prepare_qat`: "
                    "`ConvBnReLU2d`/`ConvBn2d` QAT modules (BN folded into the fake-quantized weight), output "
                    "fake-quant per fused module, observers on."
                ),
            ),
        ]

    load_before = os.getloadavg()[0]
    prepare(variants, x, y)
    mask, waited = measure(variants, x, y, args)
    load_after = os.getloadavg()[0]
    for v in variants:
        if v.error is None:
            v.memory = measure_memory(v, x, y)
    stats = fused_stats()

    info = machine_info(args.threads)
    rows = results(variants, mask)
    print(markdown_table(rows))
    print(contention_line(mask, args, waited))
    print(fused_line(stats))
    print(memory_table(rows))
    for r in rows:
        for w in r["warnings"]:
            print(f"warning ({r['variant']}): {w}")
    if not args.no_write:
        update_markdown(args.output, section(args, rows, info, command, (load_before, load_after), mask, waited, stats))
        print(f"updated {args.output}")
    if args.json is not None:
        payload = {
            "command": command,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": info,
            "load_average": [load_before, load_after],
            "clean_rounds": mask,
            "seconds_waited_for_quiet": waited,
            "fused": stats,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.profile:
        profile(variants, x, y)
    return 0


if __name__ == "__main__":
    sys.exit(main())
