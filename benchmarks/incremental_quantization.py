"""SLQ / MLQ benchmark: incremental codebook quantization vs INQ-style power-of-two vs uniform LSQ QAT on MNIST.

For LeNet-5 and ResNet-8 (trained in full precision once, seed 0, ``--fp-epochs``, on ``--train-subset`` images)
and each bit width in ``--bits`` (2 = ternary for the codebook methods), every method fine-tunes the FP model for
the same number of epochs (``len(schedule) * --epochs-per-stage``), weights only (inputs in float, every Conv/Linear
layer at the same bits, the first and last included), Adam at ``--lr``:

* **SLQ**: ``IncrementalQuantizationCallback(mode="slq")``: per layer 2**(b-1)+1 k-means clusters with one at 0,
  frozen in stages (0.3, 0.55, 0.75, 0.9, 1.0) of each layer's weights, the rest retrained;
* **MLQ**: ``mode="mlq"``: the same stages over the whole network, layer after layer;
* **INQ-style**: ``codebook="power_of_two"``: 0 and 2**(b-2) powers of two per sign, the same stages as SLQ;
* **LSQ**: ``QuantizationAwareTraining(weight_bits=b, act_bits=None, first_last_bits=None)``: per-channel uniform
  grids with learned step sizes (2**b levels: at b=2 four levels, not three);
* **FP32 fine-tuned as long** (a control; ``--no-fp-control`` skips it): what the extra epochs give without
  quantization;
* optional (``--methods ... slq_loss``): SLQ with ``partition="loss"`` instead of the magnitude order.

Finished runs are appended to a ``rows_*.jsonl`` file in ``--workdir``; a re-run with the same settings reuses
them, so an interrupted run continues where it stopped.

Reported: test accuracy (10,000 MNIST test images; mean and spread over ``--seeds``), the validation accuracy after
each stage (``--val-batches`` batches of the held-out split), and the packed size of the model
(``model_size_report``: weight indices or codes at their bits + codebooks / step sizes + the float rest, i.e.
biases and BatchNorm).

Usage::

    python benchmarks/incremental_quantization.py                      # short default run, updates BENCHMARKS.md
    python benchmarks/incremental_quantization.py --seeds 2 --train-subset 0 --fp-epochs 5 --epochs-per-stage 2
    python benchmarks/incremental_quantization.py --no-write           # print only
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
from common import quiet_logs, quiet_trainer, rerun_command, write_section  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
HEADER = "## Incremental quantization (SLQ / MLQ)"
SCHEDULE = (0.3, 0.55, 0.75, 0.9, 1.0)
METHODS = ("slq", "mlq", "inq", "lsq")
#: optional: SLQ with the loss-based partition instead of the magnitude order
EXTRA_METHODS = ("slq_loss",)
#: the float model fine-tuned for as many epochs: what the extra epochs alone give
LABELS = {
    "slq": "SLQ",
    "slq_loss": "SLQ, loss partition",
    "mlq": "MLQ",
    "inq": "INQ-style (power of two)",
    "lsq": "LSQ QAT (uniform, per channel)",
    "fp": "FP32, fine-tuned as long",
}


def _models():
    from lightning_quant.models import LeNet5, resnet8

    return {
        "LeNet-5": lambda: LeNet5(in_channels=1, num_classes=10, input_size=28),
        "ResNet-8": lambda: resnet8(in_channels=1, num_classes=10),
    }


def run(args: argparse.Namespace) -> list[dict]:
    import lightning as L

    from lightning_quant import IncrementalQuantizationCallback, QuantizationAwareTraining
    from lightning_quant.datamodules import MNISTDataModule
    from lightning_quant.export.packing import model_size_report
    from lightning_quant.models import ImageClassifier

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    subset = args.train_subset or None

    def data(seed: int) -> MNISTDataModule:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=subset)

    epochs = len(SCHEDULE) * args.epochs_per_stage
    rows: list[dict] = []
    # every finished run is appended here, and a re-run with the same settings reuses it (a long run can be resumed)
    log_path = out / (
        f"rows_{subset or 'all'}_fp{args.fp_epochs}_eps{args.epochs_per_stage}_lr{args.lr:g}"
        f"_val{args.val_batches}.jsonl"
    )
    done = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["bits"], r["method"], r["seed"])] = r

    def finished(row: dict) -> None:
        print(row, flush=True)
        rows.append(row)
        if (row["model"], row["bits"], row["method"], row["seed"]) not in done:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    for model_name, make in _models().items():
        if args.models and model_name not in args.models:
            continue
        fp_path = out / f"{model_name}_{subset or 'all'}_{args.fp_epochs}ep_fp.pt"
        fp = ImageClassifier(make(), lr=3e-3, scheduler="cosine")
        if fp_path.exists():
            fp.load_state_dict(torch.load(fp_path))
        else:
            L.seed_everything(0)
            quiet_trainer(args.fp_epochs, [], out).fit(fp, data(0))
            torch.save(fp.state_dict(), fp_path)
        fp_acc = quiet_trainer(1, [], out).test(fp, data(0), verbose=False)[0]["test/acc"]
        fp_size = model_size_report_fp(fp)
        print({"model": model_name, "fp_acc": fp_acc, "fp_bytes": fp_size}, flush=True)
        if args.fp_control:
            for seed in range(args.seeds):
                if (model_name, 32, "fp", seed) in done:
                    finished(done[(model_name, 32, "fp", seed)])
                    continue
                L.seed_everything(seed)
                model = ImageClassifier(make(), lr=args.lr, optimizer="adam")
                model.load_state_dict(torch.load(fp_path))
                start = time.perf_counter()
                quiet_trainer(epochs, [], out).fit(model, data(seed))
                seconds = time.perf_counter() - start
                acc = quiet_trainer(1, [], out).test(model, data(seed), verbose=False)[0]["test/acc"]
                row = {"model": model_name, "bits": 32, "method": "fp", "seed": seed, "fp_acc": fp_acc}
                row.update(fp_bytes=fp_size, acc=acc, stage_acc=[], total_bytes=fp_size, weight_bytes=fp_size)
                row.update(side_bytes=0, float_bytes=0, seconds=seconds)
                finished(row)
        for bits in args.bits:
            for method in args.methods:
                if method == "lsq" and bits < 2:
                    continue
                for seed in range(args.seeds):
                    if (model_name, bits, method, seed) in done:
                        finished(done[(model_name, bits, method, seed)])
                        continue
                    L.seed_everything(seed)
                    model = ImageClassifier(make(), lr=args.lr, optimizer="adam")
                    model.load_state_dict(torch.load(fp_path))
                    if method == "lsq":
                        callback = QuantizationAwareTraining(
                            weight_bits=bits, act_bits=None, first_last_bits=None, num_calibration_batches=1
                        )
                    else:
                        callback = IncrementalQuantizationCallback(
                            bits=bits,
                            schedule=SCHEDULE,
                            epochs_per_stage=args.epochs_per_stage,
                            mode="mlq" if method == "mlq" else "slq",
                            codebook="power_of_two" if method == "inq" else "kmeans",
                            partition="loss" if method == "slq_loss" else "magnitude",
                            plot=False,
                        )
                    trainer = quiet_trainer(epochs, [callback], out, val_batches=args.val_batches)
                    start = time.perf_counter()
                    trainer.fit(model, data(seed))
                    seconds = time.perf_counter() - start
                    acc = quiet_trainer(1, [], out).test(model, data(seed), verbose=False)[0]["test/acc"]
                    report = model_size_report(model)
                    stages = (
                        [h["accuracy"] for h in callback.history]
                        if isinstance(callback, IncrementalQuantizationCallback)
                        else []
                    )
                    row = {
                        "model": model_name,
                        "bits": bits,
                        "method": method,
                        "seed": seed,
                        "fp_acc": fp_acc,
                        "fp_bytes": fp_size,
                        "acc": acc,
                        "stage_acc": stages,
                        "total_bytes": report.total_bytes,
                        "weight_bytes": report.weight_bytes,
                        "side_bytes": report.scale_bytes,
                        "float_bytes": report.float_bytes,
                        "seconds": seconds,
                    }
                    finished(row)
    return rows


def model_size_report_fp(model: torch.nn.Module) -> int:
    """Bytes of the float32 model's floating-point tensors."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


def _fmt_acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f} %"
    return f"{100 * statistics.mean(values):.2f} % (±{100 * (max(values) - min(values)) / 2:.2f})"


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    seeds = args.seeds
    subset = f"the first {args.train_subset:,} training images" if args.train_subset else "all 55,000 training images"
    lines = [
        HEADER,
        "",
        f"MNIST ({subset} after a 5,000-image validation split; test on all 10,000 test images). FP models trained "
        f"{args.fp_epochs} epochs (Adam 3e-3, cosine, seed 0). Every method then fine-tunes the FP model for "
        f"{len(SCHEDULE) * args.epochs_per_stage} epochs (Adam lr {args.lr:g}, constant; weights only, inputs in "
        "float, every Conv/Linear layer at the same bits, the first and last included), "
        f"{seeds} seed(s) (the seed changes the data order). SLQ / MLQ / INQ-style: stages "
        f"{list(SCHEDULE)}, {args.epochs_per_stage} epoch(s) each; codebooks of 2^(b-1)+1 entries with one at 0 "
        "(b = 2: ternary), indices stored at b bits, float32 codebook. LSQ: per-channel uniform grids (2^b levels; "
        "at b = 2 four levels), learned step sizes. Packed size: `model_size_report` (indices or codes at their "
        "bits + codebooks or step sizes + float biases and BatchNorm).",
        "",
        "```",
        rerun_command("incremental_quantization.py", sys.argv[1:]),
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs while it ran), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}; measured "
        f"{dt.date.today()}.",
        "",
        "| model | bits | method | test accuracy | val accuracy after each stage | packed KiB (indices/codes + "
        "codebooks/scales + float) | vs FP32 | fine-tune time |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["bits"], r["method"]), []).append(r)
    fp_done = set()
    models, methods = list(_models()), ["fp", *METHODS, *EXTRA_METHODS]
    order = sorted(groups, key=lambda k: (models.index(k[0]), -k[1], methods.index(k[2])))
    for model, bits, method in order:
        group = groups[(model, bits, method)]
        first = group[0]
        if model not in fp_done:
            fp_done.add(model)
            lines.append(
                f"| {model} | 32 | FP32 (the starting point) | {100 * first['fp_acc']:.2f} % | | "
                f"{first['fp_bytes'] / 1024:.1f} | 1.0x | |"
            )
        stage = (
            " → ".join(f"{100 * a:.1f}" if a is not None else "–" for a in first["stage_acc"])
            if first["stage_acc"]
            else ""
        )
        kib = first["total_bytes"] / 1024
        parts = (
            f"{first['weight_bytes'] / 1024:.1f} + {first['side_bytes'] / 1024:.2f} + {first['float_bytes'] / 1024:.1f}"
        )
        label = "ternary" if bits == 2 and method not in ("lsq", "fp") else str(bits)
        if method == "fp":
            parts = "float32"
        lines.append(
            f"| {model} | {label} | {LABELS[method]} | {_fmt_acc([r['acc'] for r in group])} | {stage} | "
            f"{kib:.1f} ({parts}) | {first['fp_bytes'] / first['total_bytes']:.1f}x | "
            f"{statistics.mean(r['seconds'] for r in group):.0f} s |"
        )
    lines += [
        "",
        "The FP32 starting point is trained briefly (a subset, few epochs), so the extra fine-tuning epochs alone "
        "raise its accuracy: compare the quantized rows with the *FP32, fine-tuned as long* row, not only with the "
        "starting point. The stage column is seed 0's validation accuracy at the end of each stage (the part of "
        "the weights frozen so far quantized, the rest still float), on "
        f"{args.val_batches} batches of 128 held-out images. Times are wall time on the shared machine (they include "
        "validation).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="MNIST root")
    parser.add_argument("--models", nargs="+", default=None, choices=list(_models()), help="default: both")
    parser.add_argument("--bits", type=int, nargs="+", default=[5, 4, 3, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS + EXTRA_METHODS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=5000, help="training images (0: all)")
    parser.add_argument("--fp-epochs", type=int, default=3)
    parser.add_argument("--epochs-per-stage", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--val-batches", type=int, default=10)
    parser.add_argument("--no-fp-control", dest="fp_control", action="store_false", help="skip the FP fine-tune row")
    parser.add_argument("--workdir", default="/tmp/lightning_quant_slq")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1: robust when shared)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    rows = run(args)
    section = _table(rows, args)
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", HEADER, section)


if __name__ == "__main__":
    main()
