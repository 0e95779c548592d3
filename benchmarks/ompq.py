"""OMPQ benchmarks: allocation wall time on torchvision ResNet-18, and (``--mnist``) accuracy against uniform,
QBitOpt and a HAWQ-style allocation at the same average bits, with the beta sweep.

Part 1 (default, about a minute): :func:`~lightning_quant.orthogonal_allocation` on torchvision's ResNet-18
(random init, 1000 classes) for one batch of 32 images at 224x224 and at 32x32, under a 6.7 MiB weight budget
(beta 10, 4-8 bits, first and last layer at 8): the whole call (a structural copy, quantization of the copy, the
forward pass with the Gram-matrix hooks, the ORM and the solve), and the bare forward pass for reference. First call
and the median of ``--repeats`` more.

Part 2 (``--mnist``; the defaults are sized for about 20 minutes on the shared 2-core machine when it is not
crowded): ResNet-8 (1-channel input) on a subset of MNIST. One FP model is trained once and cached in ``--workdir``;
every variant fine-tunes it with the same short QAT schedule (``--qat-steps`` Adam steps, LSQ, 8-bit inputs, first
and last layer at 8 bits and counted) for each seed (the seed changes the data split and order, not the FP start):

* uniform 3-bit weights (the reference: its average weight bits, 3.05, is every allocator's budget),
* OMPQ, widths 2-8 from the seed's first 32 training images, with the default solver (``monotone``) and with
  ``relaxed`` (the LP + rounding, which uses the budget more fully), and the beta sweep (relaxed; beta 0, 1, 10,
  100). The allocations come from :func:`~lightning_quant.orthogonal_allocation` (the callback's computation; the
  callback itself is exercised by the tests), then QAT runs with that recipe; allocations that coincide are
  trained once (the same widths, seed and schedule train to the same model),
* a HAWQ-style one-shot allocation (Hutchinson Hessian-diagonal sensitivities of the FP weights + the MILP; the
  weight steps of the layers it changes re-initialised at their new widths, as OMPQ's are),
* QBitOpt (``BitReallocationCallback``, re-solved every ``--every-n-steps``, frozen after half the QAT steps).

Reported: test accuracy (mean ± std; the first ``--test-batches`` batches of 128 of the MNIST test set), paired
differences to uniform by seed, the average weight bits actually used, the bits per layer (seed 0), and each
allocator's own time (OMPQ and HAWQ: the allocation; QBitOpt: its fit time minus the uniform run's on the same
seed).

Usage::

    python benchmarks/ompq.py                        # timing only, updates BENCHMARKS.md
    python benchmarks/ompq.py --mnist                # + the MNIST comparison and the beta sweep
    python benchmarks/ompq.py --mnist --no-write     # print only
    python benchmarks/ompq.py --from-json runs/ompq_bench/ompq_results.json   # rebuild the section from a run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (  # benchmarks/common.py (the script's folder is on sys.path)
    OneShotHawq,
    paired_differences,
    quiet_logs,
    quiet_trainer,
    rerun_command,
    write_section,
)

from lightning_quant import orthogonal_allocation

ROOT = Path(__file__).resolve().parents[1]
HEADER = "## OMPQ: bit allocation from network orthogonality"
TARGET_S = 5.0
MIB = 8 * 2**20
BIT_CHOICES = (2, 3, 4, 5, 6, 7, 8)


# -- part 1: allocation time --------------------------------------------------------------------------------------
def time_resnet18(sizes: list[int], repeats: int, budget_mb: float, beta: float) -> list[dict]:
    import torchvision

    from lightning_quant.allocation import layer_costs
    from lightning_quant.surgery import QuantSpec, quantize_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    costs = layer_costs(quantize_model(torchvision.models.resnet18(), QuantSpec()))
    rows = []
    for size in sizes:
        images = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(size))
        times, cpu = [], []
        spec = None
        for _ in range(repeats + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            spec = orthogonal_allocation(model, images, size_budget_mb=budget_mb, beta=beta, num_samples=32)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        forward, forward_cpu = [], []
        with torch.no_grad():
            model.eval()
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                model(images)
                forward.append(time.perf_counter() - start)
                forward_cpu.append(time.process_time() - start_cpu)
            model.train()
        assert spec is not None
        size_bits = sum(spec.layers[n].weight_bits * p for n, p in zip(costs.names, costs.params, strict=True))
        rows.append(
            {
                "size": size,
                "first_s": times[0],
                "median_s": statistics.median(times[1:]),
                "forward_s": statistics.median(forward),
                "cpu_s": statistics.median(cpu[1:]),
                "forward_cpu_s": statistics.median(forward_cpu),
                "size_mib": size_bits / MIB,
                "bits": [spec.layers[n].weight_bits for n in costs.names],
            }
        )
        print(rows[-1], flush=True)
    return rows


def timing_table(rows: list[dict], budget_mb: float) -> str:
    lines = [
        "| input | whole allocation, first call (s) | median of the next: wall (s) | CPU (s) | "
        f"bare forward, eval: wall (s) | CPU (s) | weight size (MiB, budget {budget_mb}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| 32 x 3 x {r['size']} x {r['size']} | {r['first_s']:.2f} | {r['median_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['forward_s']:.2f} | {r['forward_cpu_s']:.2f} | {r['size_mib']:.3f} |"
        )
    return "\n".join(lines)


# -- part 2: MNIST ------------------------------------------------------------------------------------------------
def mnist(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import lightning as L

    from lightning_quant import (
        BitReallocationCallback,
        LayerSpec,
        QuantizationAwareTraining,
        QuantSpec,
        quantization_summary,
        quantize_model,
    )
    from lightning_quant.datamodules import MNISTDataModule
    from lightning_quant.models import ImageClassifier, resnet8
    from lightning_quant.surgery import quantized_layers

    quiet_logs()
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)

    def data(seed: int) -> MNISTDataModule:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=args.train_subset)

    def test(model) -> float:
        trainer = quiet_trainer(1, [], out, limit_test_batches=args.test_batches)
        return trainer.test(model, data(0), verbose=False)[0]["test/acc"]

    fp_path = out / f"resnet8_fp_{args.fp_epochs}ep_{args.train_subset}.pt"
    fp_info: dict = {"cached": fp_path.exists()}
    if not fp_path.exists():
        L.seed_everything(0)
        fp = ImageClassifier(resnet8(in_channels=1), lr=3e-3, scheduler="cosine")
        start = time.perf_counter()
        quiet_trainer(args.fp_epochs, [], out).fit(fp, data(0))
        fp_info["train_s"] = time.perf_counter() - start
        torch.save(fp.state_dict(), fp_path)
    fp = ImageClassifier(resnet8(in_channels=1))
    fp.load_state_dict(torch.load(fp_path))
    fp_info["acc"] = test(fp)
    print("FP", fp_info, flush=True)

    # every allocator's budget: the average weight bits of the uniform 3-bit model (first/last at 8 included)
    probe = quantize_model(ImageClassifier(resnet8(in_channels=1)), QuantSpec(default=LayerSpec(weight_bits=3)))
    avg = quantization_summary(probe).avg_weight_bits
    fp_info["budget_avg_bits"] = avg

    def fine_tune(seed: int, qat: QuantizationAwareTraining, extra: list) -> dict:
        L.seed_everything(seed)
        model = ImageClassifier(resnet8(in_channels=1), lr=1e-3, scheduler="cosine")
        model.load_state_dict(torch.load(fp_path))
        trainer = quiet_trainer(1, [qat, *extra], out, max_steps=args.qat_steps)
        start = time.perf_counter()
        trainer.fit(model, data(seed))
        return {
            "acc": test(model),
            "avg_bits": quantization_summary(model).avg_weight_bits,
            "bits": [m.weight_quantizer.bits for m in quantized_layers(model).values()],
            "fit_s": time.perf_counter() - start,
        }

    def qat(spec: QuantSpec | None = None, weight_bits: int = 8) -> QuantizationAwareTraining:
        if spec is not None:
            return QuantizationAwareTraining(spec=spec, num_calibration_batches=args.calibration_batches)
        return QuantizationAwareTraining(weight_bits, 8, num_calibration_batches=args.calibration_batches)

    ompq = {"OMPQ beta 10, monotone": (10.0, "monotone")}
    ompq.update({f"OMPQ beta {b:g}, relaxed": (float(b), "relaxed") for b in sorted({10.0, *args.sweep})})
    rows = []
    for seed in range(args.seeds):
        seeded = data(seed)
        seeded.prepare_data()
        seeded.setup("fit")
        images = next(iter(seeded.train_dataloader()))[0][: args.num_samples]  # the seed's first training images
        done: dict[tuple, dict] = {}  # QAT runs by allocation: the same widths train to the same model

        def record(name: str, result: dict, allocator_s: float | None, seed: int = seed) -> None:
            rows.append({"variant": name, "seed": seed, **result, "allocator_s": allocator_s})
            print({k: v for k, v in rows[-1].items() if k != "bits"}, rows[-1]["bits"], flush=True)

        record("uniform 3-bit", fine_tune(seed, qat(weight_bits=3), []), None)
        for name, (beta, solver) in ompq.items():
            start = time.perf_counter()
            spec = orthogonal_allocation(
                fp,
                images,
                avg_weight_bits=avg,
                beta=beta,
                bit_choices=BIT_CHOICES,
                solver=solver,
                num_samples=args.num_samples,
            )
            seconds = time.perf_counter() - start
            key = tuple(layer.weight_bits for layer in spec.layers.values())
            if key not in done:
                done[key] = fine_tune(seed, qat(spec), [])
            record(name, done[key], seconds)
        hawq = OneShotHawq(seeded, args.hutchinson_samples, avg, BIT_CHOICES, recalibrate=True)
        result = fine_tune(seed, qat(), [hawq])
        record("HAWQ-style one-shot", result, hawq.seconds)
        qbitopt = BitReallocationCallback(
            avg_weight_bits=avg, every_n_steps=args.every_n_steps, freeze_after=args.qat_steps // 2, plot=False
        )
        record("QBitOpt", fine_tune(seed, qat(), [qbitopt]), None)
    return rows, fp_info


def _allocator_time(rows: list[dict], name: str) -> str:
    rs = [r for r in rows if r["variant"] == name]
    if name == "uniform 3-bit":
        return "–"
    if name == "QBitOpt":
        base = {r["seed"]: r["fit_s"] for r in rows if r["variant"] == "uniform 3-bit"}
        extra = [r["fit_s"] - base[r["seed"]] for r in rs if r["seed"] in base]
        return f"{statistics.mean(extra):+.1f} s of fit time vs uniform" if extra else "–"
    return f"{statistics.mean(r['allocator_s'] for r in rs):.2f} s"


def mnist_table(rows: list[dict], names: list[str]) -> str:
    lines = [
        "| variant | test accuracy (mean ± std) | by seed | − uniform, paired (mean ± std, ahead) | "
        "avg weight bits used | bits per layer (seed 0) | allocator time |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        accs = [100 * r["acc"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        if name == "uniform 3-bit":
            paired = "–"
        else:
            mean_d, std_d, ahead, count = paired_differences(rows, name, "uniform 3-bit") or (0.0, 0.0, 0, 0)
            paired = f"{mean_d:+.2f} ± {std_d:.2f} ({ahead}/{count})"
        seed0 = next((r for r in rs if r["seed"] == 0), rs[0])
        by_seed = ", ".join(f"{a:.2f}" for a in accs)
        lines.append(
            f"| {name} | {statistics.mean(accs):.2f} ± {std:.2f} % | {by_seed} | {paired} | "
            f"{statistics.mean(r['avg_bits'] for r in rs):.3f} | {seed0['bits']} | {_allocator_time(rows, name)} |"
        )
    return "\n".join(lines)


def mnist_summary(rows: list[dict], main: list[str], sweep: list[str]) -> str:
    """What the tables say, in words: the best variant and beta by mean paired difference, and whether that
    difference stands out from its spread over seeds."""

    def paired(name: str) -> tuple[float, float, int, int]:
        return paired_differences(rows, name, "uniform 3-bit") or (float("nan"), float("nan"), 0, 0)

    def verdict(name: str) -> str:
        mean, std, ahead, count = paired(name)
        if mean > 0 and mean > std:
            return f"ahead of uniform by {mean:+.2f} ± {std:.2f} points (on {ahead} of {count} seeds)"
        return f"{mean:+.2f} ± {std:.2f} points against uniform (ahead on {ahead} of {count} seeds): " + (
            "not better than uniform" if mean <= 0 else "within the seed-to-seed spread, not a clear win"
        )

    betas = [n for n in sweep if n != "uniform 3-bit" and any(r["variant"] == n for r in rows)]
    best_beta = max(betas, key=lambda n: paired(n)[0])
    others = [n for n in main if n != "uniform 3-bit" and any(r["variant"] == n for r in rows)]
    best = max(others, key=lambda n: paired(n)[0])
    spread = {
        n: statistics.stdev([100 * r["acc"] for r in rows if r["variant"] == n])
        for n in others
        if sum(r["variant"] == n for r in rows) > 1
    }
    widest = max(spread, key=spread.get) if spread else None
    text = (
        f"In this run the best variant of the main table is {best}: {verdict(best)}. The best beta of the sweep is "
        f"{best_beta.removeprefix('OMPQ ').removesuffix(', relaxed')}: {verdict(best_beta)}."
    )
    if widest is not None:
        text += f" The widest spread over seeds is {widest}'s ({spread[widest]:.2f} points; see the seeds column)."
    return text


# -- report -------------------------------------------------------------------------------------------------------
def measured_on() -> dict:
    """Where and when the run was measured (kept with the raw results)."""
    return {
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs",
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }


def section(
    args: argparse.Namespace,
    timing: list[dict],
    mnist_rows: list[dict] | None,
    fp: dict,
    command: str,
    where: dict,
    minutes: float,
) -> str:
    machine = (
        f"{where['cpu']}, {args.threads} torch thread(s), torch {where['torch']}; measured {where['date']} "
        f"(load average {where['load']:.1f} at the end; the whole run took {minutes:.0f} min of wall time)"
    )
    worst = max(r["median_s"] for r in timing)
    worst_cpu = max(r["cpu_s"] for r in timing)
    verdict = (
        f"{'met' if worst <= TARGET_S else 'missed'} in wall time (worst median {worst:.2f} s); "
        f"{'met' if worst_cpu <= TARGET_S else 'missed'} in CPU time (worst median {worst_cpu:.2f} s)"
    )
    text = f"""{HEADER}

`orthogonal_allocation` on torchvision's ResNet-18 (random init), one batch of 32 images, weight budget
{args.budget_mb} MiB, beta {args.beta:g}, widths 4-8 (first and last layer at 8): the whole call -- a copy of the
model's modules, its quantization, the forward pass with hooks that keep only each layer's 32 x 32 centred Gram
matrix, the ORM, the budget-monotone solve -- and the bare forward pass alone. {args.repeats} repeats after the first.

```
{command}
```

Machine: {machine}.

{timing_table(timing, args.budget_mb)}

Target (issue): ≤ {TARGET_S:.0f} s including the forward pass -- {verdict}. With {args.threads} thread(s) the
process's CPU time is about what the call takes on an otherwise idle core; the wall time is what it took on this
crowded machine. The forward pass is most of it at 224x224; at 32x32 the fixed costs (copying and quantizing the
model's modules) weigh more.
"""
    if mnist_rows:
        cached = "; trained by an earlier run of this script, kept in --workdir" if fp.get("cached") else ""
        main = ["uniform 3-bit", "OMPQ beta 10, monotone", "OMPQ beta 10, relaxed", "QBitOpt", "HAWQ-style one-shot"]
        sweep = [f"OMPQ beta {b:g}, relaxed" for b in sorted(set(args.sweep) | {10.0})]
        text += f"""
MNIST, ResNet-8 (1-channel input), {args.seeds} seeds. One FP model ({args.fp_epochs} epochs on a
{args.train_subset or "full"}-image training subset, test accuracy {100 * fp["acc"]:.2f} %{cached}) fine-tuned by every
variant with the same short QAT schedule ({args.qat_steps} steps of 128 images, Adam 1e-3 cosine, LSQ,
{args.calibration_batches} calibration batches, inputs 8-bit, first and last layer 8-bit and counted). Budget of
every allocator: the uniform 3-bit model's average weight bits, {fp["budget_avg_bits"]:.4f}; widths 2-8. Test
accuracy on the first {args.test_batches * 128} MNIST test images. OMPQ's allocations are from
`orthogonal_allocation` on the seed's first 32 training images; QAT then trains with that recipe.

{mnist_table(mnist_rows, main)}

Beta sweep (OMPQ, relaxed solver; same seeds):

{mnist_table(mnist_rows, ["uniform 3-bit", *sweep])}

{mnist_summary(mnist_rows, main, ["uniform 3-bit", *sweep])} Allocations that coincide (the same widths for the
same seed) are trained once and share a row's accuracy. With {args.seeds} seeds, {args.qat_steps} QAT steps and
{args.test_batches * 128} test images the differences are small against the spread: a longer run (more seeds, more
steps, the whole test set) is what would settle them.
"""
    else:
        text += """
The MNIST comparison (OMPQ vs uniform vs QBitOpt vs HAWQ-style at the same average bits, and the beta sweep) is
`python benchmarks/ompq.py --mnist`; it has not been run for this table yet.
"""
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-mb", type=float, default=6.7)
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--mnist", action="store_true", help="also run the MNIST comparison and the beta sweep")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "ompq_bench"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fp-epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--qat-steps", type=int, default=30)
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--test-batches", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--every-n-steps", type=int, default=5)
    p.add_argument("--hutchinson-samples", type=int, default=8)
    p.add_argument("--sweep", type=float, nargs="+", default=[0.0, 1.0, 100.0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--from-json",
        default=None,
        help="rebuild the section from the raw results a run saved (ompq_results.json in --workdir), no measuring",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_json:  # the saved run's own arguments, so the section describes what was measured
        saved = json.loads(Path(args.from_json).read_text())
        run_args = parse_args(saved["argv"])
        run_args.output, run_args.no_write = args.output, args.no_write
        args, argv = run_args, saved["argv"]
        timing, mnist_rows, fp = saved["timing"], saved["mnist_rows"], saved["fp"]
    else:
        start = time.perf_counter()
        torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
        timing = time_resnet18(args.sizes, args.repeats, args.budget_mb, args.beta)
        mnist_rows, fp = mnist(args) if args.mnist else (None, {})
        results = Path(args.workdir) / "ompq_results.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        saved = {"argv": argv, "timing": timing, "mnist_rows": mnist_rows, "fp": fp, "where": measured_on()}
        saved["minutes"] = (time.perf_counter() - start) / 60
        results.write_text(json.dumps(saved, indent=1, default=float))
        print(f"raw results: {results}")
    text = section(args, timing, mnist_rows, fp, rerun_command("ompq.py", argv), saved["where"], saved["minutes"])
    print(text)
    if not args.no_write:
        write_section(Path(args.output), HEADER, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
