"""QBitOpt benchmarks: solver time and quality, and (optionally) MNIST accuracy of the reallocation.

Part 1 (default, seconds): solve time of :func:`~lightning_quant.allocation.solve_relaxed` (LP relaxation of
the noise-model table in cvxpy/HiGHS + budget-keeping rounding) and :func:`~lightning_quant.allocation.solve_milp`
(HiGHS) for 20, 100 and 300 layers under an average-weight-bit budget of 3.0 with bit choices 2..8. Layer sizes
are log-uniform in [1e3, 1e6] parameters and sensitivities log-normal (sigma 2), seeded. Reported: the first solve
(cvxpy compiles the relaxed problem once per shape), the median of the following ``--repeats`` solves (new
sensitivities each, as during training), the relaxed result's objective over the MILP's, and the budget used.

Part 2 (``--mnist``, heavy: tens of minutes on 2 cores): ResNet-8 on MNIST from one FP checkpoint, then QAT
(LSQ, inputs 8-bit, first/last layer 8-bit) with

* uniform 3-bit weights,
* QBitOpt at an average of 3 and 2.5 weight bits (``BitReallocationCallback``, re-solved every
  ``--every-n-steps``, frozen after half the QAT steps),
* HAWQ-style one-shot allocation at 3 bits (Hutchinson Hessian-diagonal sensitivities of the FP checkpoint + the
  MILP, bits fixed before QAT),

for ``--seeds`` seeds; test accuracy (mean ± std) and the average weight bits actually used.

Usage::

    python benchmarks/qbitopt.py                    # solver table, updates BENCHMARKS.md
    python benchmarks/qbitopt.py --mnist --seeds 3  # + the MNIST table
    python benchmarks/qbitopt.py --no-write         # print only
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import (  # benchmarks/common.py (the script's folder is on sys.path)
    OneShotHawq,
    paired_differences,
    quiet_logs,
    quiet_trainer,
    rerun_command,
    write_section,
)

from lightning_quant.allocation import BudgetConstraint, noise_objective_table, solve_milp, solve_relaxed

ROOT = Path(__file__).resolve().parents[1]
HEADER = "## QBitOpt bit allocation"
TARGET_MS = 100.0


# -- part 1: solvers ----------------------------------------------------------------------------------------------
def random_problem(n: int, rng: np.random.Generator, avg_bits: float = 3.0) -> tuple[np.ndarray, BudgetConstraint]:
    params = np.round(10 ** rng.uniform(3, 6, n))
    constraint = BudgetConstraint(
        "avg_weight_bits", params, float(np.floor(avg_bits * params.sum())), display_scale=1 / params.sum()
    )
    return rng.lognormal(0, 2, n), constraint


def time_solvers(sizes: list[int], repeats: int, milp_time_limit: float) -> list[dict]:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        sens, constraint = random_problem(n, rng)
        first = solve_relaxed(noise_objective_table(sens, range(2, 9)), [constraint], range(2, 9)).seconds
        relaxed_t, milp_t, ratios, used = [], [], [], []
        milp_first = None
        for _ in range(repeats):
            table = noise_objective_table(rng.lognormal(0, 2, n), range(2, 9))
            relaxed = solve_relaxed(table, [constraint], range(2, 9))
            milp = solve_milp(table, [constraint], range(2, 9), time_limit=milp_time_limit)
            milp_first = milp.seconds if milp_first is None else milp_first
            relaxed_t.append(relaxed.seconds)
            milp_t.append(milp.seconds)
            ratios.append(relaxed.objective / milp.objective)
            used.append(max(relaxed.budget_used, milp.budget_used))
            assert constraint.feasible(relaxed.bits) and constraint.feasible(milp.bits)
        rows.append(
            {
                "layers": n,
                "relaxed_first_ms": 1000 * first,
                "relaxed_ms": 1000 * statistics.median(relaxed_t),
                "milp_ms": 1000 * statistics.median(milp_t),
                "gap_mean": statistics.mean(ratios) - 1,
                "gap_max": max(ratios) - 1,
                "budget_used": max(used),
            }
        )
        print(rows[-1], flush=True)
    return rows


def solver_table(rows: list[dict]) -> str:
    lines = [
        "| layers | relaxed, first solve (ms) | relaxed, median (ms) | MILP HiGHS, median (ms) | "
        "relaxed / MILP objective − 1 (mean, max) | largest budget used |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['relaxed_first_ms']:.1f} | {r['relaxed_ms']:.1f} | {r['milp_ms']:.1f} | "
            f"{100 * r['gap_mean']:.2f}%, {100 * r['gap_max']:.2f}% | {r['budget_used']:.6f} |"
        )
    return "\n".join(lines)


# -- part 2: MNIST ------------------------------------------------------------------------------------------------
def mnist(args: argparse.Namespace) -> list[dict]:
    import lightning as L

    from lightning_quant import BitReallocationCallback, QuantizationAwareTraining, quantization_summary
    from lightning_quant.datamodules import MNISTDataModule
    from lightning_quant.models import ImageClassifier, resnet8
    from lightning_quant.surgery import quantized_layers

    quiet_logs()
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)

    def data(seed: int) -> MNISTDataModule:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=args.train_subset)

    fp_path = out / "resnet8_fp.pt"
    if not fp_path.exists():
        L.seed_everything(0)
        fp = ImageClassifier(resnet8(in_channels=1), lr=3e-3, scheduler="cosine")
        quiet_trainer(args.fp_epochs, [], out).fit(fp, data(0))
        torch.save(fp.state_dict(), fp_path)
    dm = data(0)
    dm.prepare_data()
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataloader())
    total = steps_per_epoch * args.qat_epochs

    def variant(name: str, seed: int) -> dict:
        L.seed_everything(seed)
        seeded = data(seed)  # the seed changes the split and the data order, not the FP starting point
        model = ImageClassifier(resnet8(in_channels=1), lr=1e-3, scheduler="cosine")
        model.load_state_dict(torch.load(fp_path))
        weight_bits = 3 if name in ("uniform 3-bit", "HAWQ-style one-shot, avg 3") else 8
        qat = QuantizationAwareTraining(weight_bits=weight_bits, act_bits=8, num_calibration_batches=4)
        callbacks: list = [qat]
        if name.startswith("QBitOpt"):
            avg = float(name.rsplit(" ", 1)[1])
            callbacks.append(
                BitReallocationCallback(
                    avg_weight_bits=avg, every_n_steps=args.every_n_steps, freeze_after=total // 2, plot=False
                )
            )
        if name.startswith("HAWQ"):
            callbacks.append(OneShotHawq(seeded, args.hutchinson_samples, 3.0))
        t = quiet_trainer(args.qat_epochs, callbacks, out)
        start = time.perf_counter()
        t.fit(model, seeded)
        seconds = time.perf_counter() - start
        acc = t.test(model, seeded, verbose=False)[0]["test/acc"]
        bits = [m.weight_quantizer.bits for m in quantized_layers(model).values()]
        return {
            "variant": name,
            "seed": seed,
            "acc": acc,
            "avg_bits": quantization_summary(model).avg_weight_bits,
            "bits": bits,
            "seconds": seconds,
        }

    names = ["uniform 3-bit", "QBitOpt avg 3", "QBitOpt avg 2.5", "HAWQ-style one-shot, avg 3"]
    rows = []
    for seed in range(args.seeds):
        for name in names:
            rows.append(variant(name, seed))
            print(rows[-1], flush=True)
    return rows


def mnist_table(rows: list[dict]) -> str:
    lines = [
        "| variant | test accuracy (mean ± std) | seeds | avg weight bits used | per-layer bits (seed 0) | s/run |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        accs = [100 * r["acc"] for r in rs]
        seconds = statistics.mean(r["seconds"] for r in rs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {name} | {statistics.mean(accs):.2f} ± {std:.2f} % | {len(rs)} | "
            f"{max(r['avg_bits'] for r in rs):.3f} | {rs[0]['bits']} | {seconds:.0f} |"
        )
    lines += ["", *_paired_differences(rows, "uniform 3-bit")]
    return "\n".join(lines)


def _paired_differences(rows: list[dict], baseline: str) -> list[str]:
    """Each variant minus the baseline, seed by seed (same split and data order), mean ± std over seeds."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows if r["variant"] != baseline):
        paired = paired_differences(rows, name, baseline)
        if paired is not None:
            mean, std, better, count = paired
            out.append(
                f"- {name} − {baseline}, paired by seed: {mean:+.2f} ± {std:.2f} points "
                f"(ahead on {better} of {count} seeds)."
            )
    return out


# -- report -------------------------------------------------------------------------------------------------------
def section(args: argparse.Namespace, solver_rows: list[dict], mnist_rows: list[dict] | None, command: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}; measured {dt.date.today().isoformat()} (load average {load:.2f})"
    )
    worst = max(r["relaxed_ms"] for r in solver_rows if r["layers"] == max(args.layers))
    verdict = "met" if worst <= TARGET_MS else "missed"
    text = f"""{HEADER}

Solve time of one bit allocation (average weight bits ≤ 3.0, bit choices 2..8, random layer sizes log-uniform
in [1e3, 1e6] parameters, log-normal sensitivities, seeded). *relaxed* = LP relaxation (cvxpy, HiGHS) +
budget-keeping rounding and local search, which always meets the budget; *MILP* = the exact optimum with HiGHS.
The first relaxed solve includes cvxpy's one-off compilation of the problem for that layer count; the callback
re-solves the same compiled problem with new sensitivities (the median column). {args.repeats} solves per size.

```
{command}
```

Machine: {machine}.

{solver_table(solver_rows)}

Target (issue): ≤ {TARGET_MS:.0f} ms for {max(args.layers)} layers relaxed — {verdict} ({worst:.1f} ms median).
The rounded relaxation is provably within 4× (4^largest step between allowed widths) of the MILP optimum;
measured it is within the percentages above. "Budget used" is cost / budget, ≤ 1 by construction.
"""
    if mnist_rows:
        text += f"""
MNIST, ResNet-8 (1-channel input), all variants fine-tuned with QAT from the same FP checkpoint
({args.fp_epochs} FP epochs, {args.qat_epochs} QAT epochs, LSQ, inputs 8-bit, first and last layer at 8 bits
and counted in the average; train subset {args.train_subset or "all"}):

{mnist_table(mnist_rows)}
"""
    else:
        text += """
The MNIST accuracy comparison (uniform 3-bit vs QBitOpt at average 3 and 2.5 bits vs a HAWQ-style one-shot
allocation, ResNet-8, several seeds) is `python benchmarks/qbitopt.py --mnist --seeds 3` (tens of minutes on 2
cores); it has not been run for this table yet.
"""
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[20, 100, 300])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--milp-time-limit", type=float, default=60.0)
    p.add_argument("--mnist", action="store_true", help="also run the (heavy) MNIST accuracy comparison")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "qbitopt_bench"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fp-epochs", type=int, default=2)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--every-n-steps", type=int, default=50)
    p.add_argument("--hutchinson-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    solver_rows = time_solvers(args.layers, args.repeats, args.milp_time_limit)
    mnist_rows = mnist(args) if args.mnist else None
    command = rerun_command("qbitopt.py", argv)
    text = section(args, solver_rows, mnist_rows, command)
    print(text)
    if not args.no_write:
        write_section(Path(args.output), "## QBitOpt bit allocation", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
