"""FAT benchmark: FP accuracy, plain min-max calibration, and FAT after one epoch on unlabeled images.

For LeNet-5 and ResNet-8 (trained in full precision once, seed 0, ``--fp-epochs``) and each bit width in
``--bits`` (weights and inputs, WbAb, first and last layer at the same bits unless ``--first-last-bits``):

* **min-max calibration**: ``ThresholdTuningCallback`` run for its ``--calib-batches`` calibration batches only
  (BatchNorm folded, per-channel weight min/max, per-tensor running min/max of the inputs), no tuning;
* **FAT**: the same calibration, then one epoch over at most ``--images`` *unlabeled* training images (a loader
  that yields images only, a LightningModule whose own loss is a placeholder): only the thresholds' factors train,
  by the label-free distillation loss from the FP model, Adam lr 1e-3 with the official code's decay.

Reported: test accuracy of each, and the wall time of the FAT run (``trainer.fit``: calibration + tuning).
Default data: sklearn digits at 16x16 (seconds); ``--mnist`` for MNIST 28x28 from ``--data`` (minutes).

Usage::

    python benchmarks/threshold_tuning.py                    # digits, updates BENCHMARKS.md
    python benchmarks/threshold_tuning.py --mnist            # MNIST, <= 10,000 unlabeled images
    python benchmarks/threshold_tuning.py --no-write         # print only
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from common import quiet_logs, quiet_trainer, write_section  # benchmarks/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
HEADER = "## Threshold tuning (FAT)"


def _models(size: int):
    from lightning_quant.models import LeNet5, resnet8

    return {
        "LeNet-5": lambda: LeNet5(in_channels=1, num_classes=10, input_size=size),
        "ResNet-8": lambda: resnet8(in_channels=1, num_classes=10),
    }


def run(args: argparse.Namespace) -> list[dict]:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_quant import ThresholdTuningCallback
    from lightning_quant.callbacks.threshold_tuning import fat_loss
    from lightning_quant.datamodules import DigitsDataModule, MNISTDataModule
    from lightning_quant.models import ImageClassifier

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    if args.mnist:
        dm = MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=0)
        size, batch = 28, 128
    else:
        dm = DigitsDataModule(batch_size=64, image_size=16, seed=0)
        size, batch = 16, 64
    dm.prepare_data()
    dm.setup("fit")
    images = torch.stack([dm.train_dataset[i][0] for i in range(min(args.images, len(dm.train_dataset)))])
    args.num_images = len(images)
    dm.setup("test")
    test_images = torch.cat([x for x, _ in dm.test_dataloader()])
    rows = []
    for model_name, make in _models(size).items():
        fp_path = out / f"{'mnist' if args.mnist else 'digits'}_{model_name}_{args.fp_epochs}ep_fp.pt"
        fp = ImageClassifier(make(), lr=3e-3, scheduler="cosine")
        if fp_path.exists():
            fp.load_state_dict(torch.load(fp_path))
        else:
            L.seed_everything(0)
            quiet_trainer(args.fp_epochs, [], out).fit(fp, dm)
            torch.save(fp.state_dict(), fp_path)
        fp_acc = quiet_trainer(1, [], out).test(fp, dm, verbose=False)[0]["test/acc"]
        print({"model": model_name, "fp_acc": fp_acc}, flush=True)
        with torch.no_grad():
            fp_logits = fp.eval()(test_images)
        for bits in args.bits:
            row = {"model": model_name, "bits": bits, "fp_acc": fp_acc}
            for variant in ("calib", "fat"):
                L.seed_everything(0)
                # images only: ImageClassifier's own loss is 0 and FAT's distillation loss replaces it
                student = ImageClassifier(copy.deepcopy(fp.backbone))
                cb = ThresholdTuningCallback(
                    bits=bits,
                    num_calibration_batches=args.calib_batches,
                    calibration=args.calibration,
                    first_last_bits=args.first_last_bits,
                    lr=args.lr,
                )
                loader = DataLoader(images, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
                max_steps = args.calib_batches if variant == "calib" else -1
                start = time.perf_counter()
                quiet_trainer(1 if variant == "calib" else args.epochs, [cb], out, max_steps=max_steps).fit(
                    student, loader
                )
                seconds = time.perf_counter() - start
                acc = quiet_trainer(1, [cb], out).test(student, dm, verbose=False)[0]["test/acc"]
                row[f"{variant}_acc"] = acc
                with torch.no_grad():
                    row[f"{variant}_kd"] = fat_loss(student.eval()(test_images), fp_logits).item()
                row[f"{variant}_s"] = seconds
                if variant == "fat":
                    alphas = [float(f.alpha) for f in cb.threshold_factors().values()]
                    row["alpha_range"] = (min(alphas), max(alphas))
            print(row, flush=True)
            rows.append(row)
    return rows


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    data = "MNIST 28x28" if args.mnist else "sklearn digits 16x16"
    lines = [
        HEADER,
        "",
        f"Data: {data}. FP models trained {args.fp_epochs} epochs (seed 0). Calibration: {args.calib_batches} "
        f"batches, {args.calibration} activation ranges, per-channel weight min/max, BatchNorm folded; first/last "
        f"layer at {args.first_last_bits or 'the same'} bits. FAT: calibration + {args.epochs} epoch(s) over "
        f"{args.num_images} unlabeled training images ({args.epochs * args.num_images} image passes), only the "
        f"threshold factors train (Adam lr {args.lr:g}, the official code's decay).",
        "",
        "```",
        "python benchmarks/threshold_tuning.py " + shlex.join(sys.argv[1:]),
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}; measured {dt.date.today()}.",
        "",
        "| model | bits | FP | min-max calibration | FAT | FAT − calibration | distillation loss on test, "
        "calibration → FAT | FAT wall time | alpha range |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lo, hi = r["alpha_range"]
        lines.append(
            f"| {r['model']} | W{r['bits']}A{r['bits']} | {100 * r['fp_acc']:.2f} % | {100 * r['calib_acc']:.2f} % | "
            f"{100 * r['fat_acc']:.2f} % | {100 * (r['fat_acc'] - r['calib_acc']):+.2f} | "
            f"{r['calib_kd']:.3f} → {r['fat_kd']:.3f} | "
            f"{r['fat_s']:.1f} s | "
            f"{lo:.3f}–{hi:.3f} |"
        )
    lines += ["", *_aims(rows, len_test=10_000 if args.mnist else 360)]
    return "\n".join(lines) + "\n"


def _aims(rows: list[dict], len_test: int) -> list[str]:
    """The issue's two aims, checked row by row from the figures above (regenerated with them)."""
    out = []
    for r in rows:
        name = f"{r['model']} W{r['bits']}A{r['bits']}"
        if r["bits"] == 8:
            gap = 100 * (r["fp_acc"] - r["fat_acc"])
            verdict = "met" if gap <= 0.1 else "missed"
            out.append(f"- Aim: 8-bit FAT within 0.1 point of FP. {name}: FP − FAT = {gap:+.2f} ({verdict}).")
        else:
            diff = 100 * (r["fat_acc"] - r["calib_acc"])
            verdict = "met" if diff >= 0 else "missed"
            images = round(abs(diff) / 100 * len_test)
            out.append(
                f"- Aim: FAT ≥ min-max calibration at {r['bits']} bits. {name}: FAT − calibration = {diff:+.2f} "
                f"({verdict}; {images} of {len_test} test images)."
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", action="store_true", help="MNIST instead of sklearn digits")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="MNIST root")
    parser.add_argument("--fp-epochs", type=int, default=None, help="FP training epochs (digits 15, MNIST 3)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--images", type=int, default=10_000, help="unlabeled training images FAT may use")
    parser.add_argument(
        "--epochs", type=int, default=None, help="FAT epochs over those images (MNIST 1; digits 8: its 1,078 images)"
    )
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--calibration", choices=["minmax", "percentile"], default="minmax")
    parser.add_argument("--first-last-bits", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workdir", default="/tmp/lightning_quant_fat")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1: robust when shared)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.mnist else 8
    if args.fp_epochs is None:
        args.fp_epochs = 3 if args.mnist else 15
    quiet_logs()
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    rows = run(args)
    section = _table(rows, args)
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", HEADER, section)


if __name__ == "__main__":
    main()
