"""Block replacement benchmarks: accuracy of LSQ QAT with and without BR, step-time ratio, and prefix cost.

Part 1 (accuracy, default on sklearn digits, ``--mnist`` for MNIST): LeNet-5 and ResNet-8 are trained in full
precision once (seed 0, ``--fp-epochs``); from that one FP checkpoint each variant is fine-tuned for the same
``--qat-epochs`` with LSQ QAT (``QuantizationAwareTraining``, weights and inputs at W2A2 / W3A3 / W4A4, first and
last layer 8-bit) -- plain, or with ``BlockReplacementCallback`` (defaults: blocks "auto", T = 1,
w_i = 2^-(n-i), KD to Q weight 1, no CE on the mixed models) -- for ``--seeds`` seeds. Reported: test accuracy
mean ± std, and the median training-step time of BR over that of plain QAT (same model and bits, measured in the
same runs: ``on_train_batch_start`` to ``on_train_batch_end``, optimizer step included).

Part 2 (prefix cost): the time of the callback's forwards per step (``extra_loss``: F's logits + the n-1 mixed
forwards) with F's prefix *replayed* (the callback's way: F's blocks 1..i and its stem are not run) versus *run
with a hook* that replaces block i's output (F's whole forward runs, the prefix's result is thrown away), for
ResNet-8 (16x16 digits) and torchvision ResNet-18 (32x32 random input), batch 64.

Usage::

    python benchmarks/block_replacement.py                      # digits, 3 seeds, updates BENCHMARKS.md
    python benchmarks/block_replacement.py --mnist --seeds 3    # MNIST (tens of minutes on 2 cores)
    python benchmarks/block_replacement.py --no-write           # print only
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

import torch
from common import (  # benchmarks/common.py (the script's folder is on sys.path)
    quiet_logs,
    quiet_trainer,
    rerun_command,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
HEADER = "## Block replacement"


def _step_timer(br=None):
    """A callback that keeps the wall time of each training step, and of the BR callback's forwards in it."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.extra: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append(time.perf_counter() - self._t)
            if br is not None:
                self.extra.append(br._extra_seconds)

    return StepTimer()


def _models(dataset: str):
    from lightning_quant.models import LeNet5, resnet8

    size = 28 if dataset == "mnist" else 16
    return {
        "LeNet-5": lambda: LeNet5(in_channels=1, num_classes=10, input_size=size),
        "ResNet-8": lambda: resnet8(in_channels=1, num_classes=10),
    }


def _datamodule(args: argparse.Namespace, seed: int):
    from lightning_quant.datamodules import DigitsDataModule, MNISTDataModule

    if args.mnist:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=args.train_subset)
    return DigitsDataModule(batch_size=64, image_size=16, seed=seed)


def accuracy(args: argparse.Namespace) -> list[dict]:
    import lightning as L

    from lightning_quant import BlockReplacementCallback, QuantizationAwareTraining
    from lightning_quant.models import ImageClassifier

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = "mnist" if args.mnist else "digits"
    rows = []
    for model_name, make in _models(dataset).items():
        fp_path = out / f"{dataset}_{model_name}_fp.pt"
        if not fp_path.exists():
            L.seed_everything(0)
            fp = ImageClassifier(make(), lr=3e-3, scheduler="cosine")
            quiet_trainer(args.fp_epochs, [], out).fit(fp, _datamodule(args, 0))
            torch.save(fp.state_dict(), fp_path)
        fp = ImageClassifier(make())
        fp.load_state_dict(torch.load(fp_path))
        fp_acc = quiet_trainer(1, [], out).test(fp, _datamodule(args, 0), verbose=False)[0]["test/acc"]
        print({"model": model_name, "fp_acc": fp_acc}, flush=True)
        for bits in args.bits:
            for seed in range(args.seeds):
                for variant in ("LSQ QAT", "LSQ QAT + BR"):
                    L.seed_everything(seed)
                    model = ImageClassifier(make(), lr=args.lr, scheduler="cosine")
                    model.load_state_dict(torch.load(fp_path))
                    callbacks: list = [QuantizationAwareTraining(bits, bits, num_calibration_batches=4)]
                    br = None
                    if variant.endswith("BR"):
                        br = BlockReplacementCallback()
                        callbacks.append(br)
                    timer = _step_timer(br)
                    trainer = quiet_trainer(args.qat_epochs, [*callbacks, timer], out)
                    start = time.perf_counter()
                    trainer.fit(model, _datamodule(args, seed))
                    seconds = time.perf_counter() - start
                    acc = trainer.test(model, _datamodule(args, seed), verbose=False)[0]["test/acc"]
                    rows.append(
                        {
                            "model": model_name,
                            "bits": bits,
                            "variant": variant,
                            "seed": seed,
                            "acc": acc,
                            "fp_acc": fp_acc,
                            "step_s": statistics.median(timer.steps[5:] or timer.steps),
                            "seconds": seconds,
                            "blocks": None if br is None else len(br.block_names),
                        }
                    )
                    print(rows[-1], flush=True)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| model (FP acc) | bits | LSQ QAT | LSQ QAT + BR | BR − QAT | step time BR / QAT |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys((r["model"], r["bits"]) for r in rows))
    for model, bits in keys:
        cells = []
        means = []
        for variant in ("LSQ QAT", "LSQ QAT + BR"):
            accs = [100 * r["acc"] for r in rows if (r["model"], r["bits"], r["variant"]) == (model, bits, variant)]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            means.append(statistics.mean(accs))
            cells.append(f"{means[-1]:.2f} ± {std:.2f} %")
        steps = {
            v: statistics.median(r["step_s"] for r in rows if (r["model"], r["bits"], r["variant"]) == (model, bits, v))
            for v in ("LSQ QAT", "LSQ QAT + BR")
        }
        fp_acc = next(r["fp_acc"] for r in rows if r["model"] == model)
        lines.append(
            f"| {model} ({100 * fp_acc:.2f} %) | W{bits}A{bits} | {cells[0]} | {cells[1]} | "
            f"{means[1] - means[0]:+.2f} | {steps['LSQ QAT + BR'] / steps['LSQ QAT']:.2f}× |"
        )
    return "\n".join(lines)


def prefix_cost(args: argparse.Namespace) -> list[dict]:
    import lightning as L
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_quant import BlockReplacementCallback, QuantizationAwareTraining
    from lightning_quant.models import ImageClassifier, resnet8

    cases = {
        "ResNet-8, 16x16": (lambda: resnet8(in_channels=1), 1, 16),
        "torchvision ResNet-18, 32x32": (lambda: torchvision.models.resnet18(num_classes=10), 3, 32),
    }
    rows = []
    for name, (make, channels, size) in cases.items():
        g = torch.Generator().manual_seed(0)
        n = 64 * (args.prefix_steps + 2)
        data = DataLoader(
            TensorDataset(torch.randn(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)),
            batch_size=64,
        )
        result = {"case": name}
        for mode in ("replay", "hook"):
            L.seed_everything(0)
            model = ImageClassifier(make())
            br = BlockReplacementCallback()
            br._skip_prefix = mode == "replay"
            timer = _step_timer(br)
            callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), br, timer]
            quiet_trainer(1, callbacks, Path(args.workdir)).fit(model, data)
            result[mode] = statistics.median(timer.extra[2:])
            result[f"{mode}_step"] = statistics.median(timer.steps[2:])
            result["blocks"] = len(br.block_names)
            result["stem"] = len(br._stem)
        rows.append(result)
        print(result, flush=True)
    return rows


def prefix_table(rows: list[dict]) -> str:
    lines = [
        "| model | blocks | BR forwards, prefix replayed (ms) | BR forwards, prefix run + hook (ms) | saved | "
        "step, replayed (ms) | step, hook (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['blocks']} | {1000 * r['replay']:.1f} | {1000 * r['hook']:.1f} | "
            f"{100 * (1 - r['replay'] / r['hook']):.0f} % | {1000 * r['replay_step']:.1f} | "
            f"{1000 * r['hook_step']:.1f} |"
        )
    return "\n".join(lines)


def section(args: argparse.Namespace, acc_rows: list[dict], prefix_rows: list[dict], command: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}; "
        f"measured {dt.date.today().isoformat()} "
        f"(load average {load:.2f} at the end)"
    )
    data = (
        f"MNIST (train subset {args.train_subset or 'all'}, 5,000 held out for validation, test set 10,000)"
        if args.mnist
        else "scikit-learn digits upsampled to 16x16 (1,078 train / 360 test images)"
    )
    wins = 0
    total = 0
    for line in accuracy_table(acc_rows).splitlines()[2:]:
        total += 1
        wins += float(line.split("|")[5]) > 0
    return f"""{HEADER}

LSQ QAT with and without `BlockReplacementCallback` (defaults: blocks "auto" -- LeNet-5: its 5 layers,
ResNet-8: its 3 stages; T = 1; w_i = 2^-(n-i); KD weight to the quantized model 1; no CE on the mixed models).
{data}; each model trained once in FP ({args.fp_epochs} epochs, seed 0), then every variant fine-tuned from that
checkpoint for {args.qat_epochs} epochs (Adam, lr {args.lr}, cosine), weights and inputs at the given bits
(first/last layer 8-bit), {args.seeds} seeds: test accuracy mean ± std. Step time: median wall time of a
training step (forward, loss, backward, optimizer step) with BR over plain QAT.

```
{command}
```

Machine: {machine}.

{accuracy_table(acc_rows)}

The paper (Yu et al. 2024) reports that BR beats its base QAT method at every bit width (ImageNet, CIFAR-10).
Here BR is ahead in {wins} of {total} settings; differences within about one standard deviation are noise at
this data size.

Cost of F's prefix: the callback replays the LP outputs in place of F's blocks 1..i and F's stem (modules run
before block 1, verified on the first step to give identical results), instead of running F's whole forward with a
hook that swaps block i's output. Time of the callback's forwards per step (F's logits + n-1 mixed models; the
extra backward is in the step time), batch 64, W4A4, medians over {args.prefix_steps} steps:

{prefix_table(prefix_rows)}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", action="store_true", help="MNIST instead of the digits (tens of minutes)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "block_replacement_bench"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--fp-epochs", type=int, default=None, help="default: 20 (digits), 3 (MNIST)")
    p.add_argument("--qat-epochs", type=int, default=None, help="default: 8 (digits), 2 (MNIST)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prefix-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.fp_epochs is None:
        args.fp_epochs = 3 if args.mnist else 20
    if args.qat_epochs is None:
        args.qat_epochs = 2 if args.mnist else 8
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_logs()
    acc_rows = accuracy(args)
    prefix_rows = prefix_cost(args)
    command = rerun_command("block_replacement.py", argv)
    text = section(args, acc_rows, prefix_rows, command)
    print(text)
    if not args.no_write:
        write_section(Path(args.output), "## Block replacement", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
