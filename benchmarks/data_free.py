"""Data-free QAT (ZS-CGAN): real-data test accuracy of QAT + KD on generated, Gaussian-noise and real batches.

A ResNet-8 teacher (with BatchNorm) is trained in full precision on real data (MNIST 28x28 with ``--mnist``, else
sklearn's digits at 16x16). From it, for each bit width (W4A4, W8A8 by default; first/last layer 8-bit) and seed,
a student starting from the teacher's weights is trained for the same number of steps with LSQ QAT
(``QuantizationAwareTraining``, BatchNorm statistics frozen at the teacher's) + ``DistillationCallback(teacher="copy",
T=4)`` on:

* ``generator``: ``GeneratorDataModule`` -- a ZS-CGAN conditional generator trained against the teacher
  (CE + BN-statistics Gaussian KL + mode-seeking diversity; its training time is reported), fresh samples each epoch;
* ``plain`` (with ``--ablate-diversity``): the same generator trained without the diversity term;
* ``distilled``: ``GeneratorDataModule(source="distilled")`` -- the ZeroQ-style baseline: a pool of inputs optimised
  directly against the BN statistics (the generator's step budget), labelled by the teacher;
* ``noise``: ``GeneratorDataModule(source="noise")`` -- standard-normal inputs labelled by the teacher (the floor);
* ``real``: the real training data (the ceiling; same QAT + KD).

Synthetic epochs have as many samples as the real training set. Accuracy is measured on the real test set.

Usage::

    python benchmarks/data_free.py                         # digits, 2 seeds, updates BENCHMARKS.md
    python benchmarks/data_free.py --mnist --seeds 1       # MNIST ResNet-8 (tens of minutes on 2 cores)
    python benchmarks/data_free.py --no-write              # print only
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
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
HEADER = "## Data-free QAT (ZS-CGAN)"
SOURCES = ("generator", "plain", "distilled", "noise", "real")


def _real(args: argparse.Namespace, seed: int):
    from lightning_quant.datamodules import DigitsDataModule, MNISTDataModule

    if args.mnist:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=args.train_subset)
    return DigitsDataModule(batch_size=64, image_size=16, seed=seed)


def _test(model, args: argparse.Namespace, root: Path) -> float:
    return quiet_trainer(1, [], root).test(model, _real(args, 0), verbose=False)[0]["test/acc"]


def run(args: argparse.Namespace) -> dict:
    import lightning as L

    from lightning_quant.callbacks import DistillationCallback, QuantizationAwareTraining
    from lightning_quant.datamodules import GeneratorDataModule
    from lightning_quant.models import ImageClassifier, resnet8

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    real = _real(args, 0)
    real.setup("fit")
    shape = (1, 28, 28) if args.mnist else (1, 16, 16)
    n_train = len(real.train_dataloader().dataset)
    batch = real.batch_size

    L.seed_everything(0)
    backbone = resnet8(in_channels=1, num_classes=10, width=args.width)
    teacher = ImageClassifier(backbone, lr=args.fp_lr, scheduler="cosine")  # cosine: a settled teacher
    quiet_trainer(args.fp_epochs, [], out).fit(teacher, real)
    teacher.eval()
    fp_acc = _test(teacher, args, out)
    print(f"FP teacher: test accuracy {fp_acc:.4f}", flush=True)

    def synthetic(source: str, seed: int, diversity_weight: float = args.diversity_weight) -> GeneratorDataModule:
        return GeneratorDataModule(
            copy.deepcopy(teacher),
            num_classes=10,
            input_shape=shape,
            samples_per_epoch=n_train,
            batch_size=batch,
            generator_steps=args.generator_steps,
            generator_batch_size=128,
            generator_lr=args.generator_lr,
            bn_weight=args.bn_weight,
            diversity_weight=diversity_weight,
            val_samples=0,
            source=source,
            seed=seed,
            generator_trainer_kwargs={"enable_progress_bar": False},
        )

    gen_times, gen_acc, rows = [], [], []
    for seed in range(args.seeds):
        dm_gen = synthetic("generator", seed)
        t0 = time.perf_counter()
        dm_gen.setup("fit")
        gen_times.append(time.perf_counter() - t0)
        gen_acc.append(statistics.mean(h["teacher_acc"] for h in dm_gen.training_history[-20:]))
        print(f"seed {seed}: generator {gen_times[-1]:.1f} s, teacher acc on generated {gen_acc[-1]:.3f}", flush=True)
        dm_plain = None
        if args.ablate_diversity:
            dm_plain = synthetic("generator", seed, diversity_weight=0.0)
            dm_plain.setup("fit")
            print(f"seed {seed}: generator without diversity term {dm_plain.generator_seconds:.1f} s", flush=True)
        dm_noise = synthetic("noise", seed)
        dm_noise.setup("fit")
        dm_distilled = synthetic("distilled", seed)
        dm_distilled.setup("fit")
        print(f"seed {seed}: ZeroQ-style distilled pool {dm_distilled.generator_seconds:.1f} s", flush=True)
        for bits in args.bits:
            sources = (
                ("generator", dm_gen),
                ("plain", dm_plain),
                ("distilled", dm_distilled),
                ("noise", dm_noise),
                ("real", _real(args, seed)),
            )
            for source, dm in sources:
                if dm is None:
                    continue
                L.seed_everything(seed)
                student = copy.deepcopy(teacher).train()
                callbacks = [
                    # BatchNorm keeps the teacher's (real-data) statistics, the same for every source
                    QuantizationAwareTraining(weight_bits=bits, act_bits=bits, freeze_bn_after_epochs=0),
                    DistillationCallback(teacher="copy", temperature=4.0),
                ]
                student.lr = args.lr
                t0 = time.perf_counter()
                quiet_trainer(args.qat_epochs, callbacks, out).fit(student, datamodule=dm)
                seconds = time.perf_counter() - t0
                acc = _test(student, args, out)
                rows.append({"bits": bits, "source": source, "seed": seed, "acc": acc, "seconds": seconds})
                print(f"W{bits}A{bits} {source:9s} seed {seed}: test acc {acc:.4f} ({seconds:.1f} s)", flush=True)
    test = _real(args, 0)
    test.setup("test")
    n_test = len(test.test_dataloader().dataset)
    return {
        "fp_acc": fp_acc,
        "gen_times": gen_times,
        "gen_acc": gen_acc,
        "rows": rows,
        "n_train": n_train,
        "n_test": n_test,
    }


def _ms(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{100 * mean:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def _per_seed(values: list[float]) -> str:
    return " (" + ", ".join(f"{100 * v:.2f}" for v in values) + ")" if len(values) > 1 else ""


def section(args: argparse.Namespace, result: dict, command: str) -> str:
    data = "MNIST 28x28" if args.mnist else "sklearn digits 16x16"
    lines = [
        HEADER,
        "",
        f"{data}; ResNet-8 (width {args.width}, BatchNorm) FP teacher trained {args.fp_epochs} epochs on real data "
        "(Adam, cosine schedule): "
        f"test accuracy {100 * result['fp_acc']:.2f} %. Students start from the teacher and train {args.qat_epochs} "
        f"epochs of {result['n_train']} samples with LSQ QAT + KD from the FP teacher (T = 4), BatchNorm statistics "
        f"frozen at the teacher's; first/last layer "
        f"8-bit. Generator: {args.generator_steps} steps, batch 128, CE + {args.bn_weight} x BN Gaussian KL + "
        f"{args.diversity_weight} x mode-seeking diversity; "
        f"trained in {statistics.mean(result['gen_times']):.1f} s (mean over seeds, CPU, "
        f"{torch.get_num_threads()} thread(s)); the teacher's accuracy on the generated labels at the end of its "
        f"training: {_ms(result['gen_acc'])} % (per-seed generator times "
        f"{', '.join(f'{t:.0f} s' for t in result['gen_times'])}: the 2-core CPU was shared). Real test-set accuracy "
        f"(%) on {result['n_test']} images (one image = {100 / result['n_test']:.2f} pt), mean ± std over "
        f"{args.seeds} seed(s):",
        "",
    ]
    titles = {
        "generator": "generator (ZS-CGAN)",
        "plain": "generator without diversity term",
        "distilled": "distilled inputs (ZeroQ-style)",
        "noise": "Gaussian noise (floor)",
        "real": "real data (ceiling)",
    }
    shown = [s for s in SOURCES if any(r["source"] == s for r in result["rows"])]
    lines += [
        "| bits | " + " | ".join(titles[s] for s in shown) + " | gap generator vs real |",
        "|---" * (len(shown) + 2) + "|",
    ]
    for bits in args.bits:
        acc = {s: [r["acc"] for r in result["rows"] if r["bits"] == bits and r["source"] == s] for s in shown}
        gap = 100 * (statistics.mean(acc["real"]) - statistics.mean(acc["generator"]))
        cells = [_ms(acc[s]) + (_per_seed(acc[s]) if s in ("generator", "plain") else "") for s in shown]
        lines.append(f"| W{bits}A{bits} | " + " | ".join(cells) + f" | {gap:.2f} pt |")
    if args.seeds > 1:
        lines += ["", f"Generator columns: mean ± std, then the {args.seeds} seeds' values."]
    lines += [
        "",
        f"Command: `{command}` ({dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", action="store_true", help="MNIST 28x28 instead of the digits (tens of minutes)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "data_free_bench"))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--width", type=int, default=16, help="ResNet-8 width")
    p.add_argument("--fp-epochs", type=int, default=None, help="default: 20 (digits), 3 (MNIST)")
    p.add_argument("--fp-lr", type=float, default=3e-3)
    p.add_argument("--qat-epochs", type=int, default=None, help="default: 5 (digits), 2 (MNIST)")
    p.add_argument(
        "--lr", type=float, default=2e-4, help="QAT learning rate (Adam; the student starts from the teacher)"
    )
    p.add_argument("--generator-steps", type=int, default=None, help="default: 500 (digits), 2000 (MNIST)")
    p.add_argument("--generator-lr", type=float, default=3e-3)
    p.add_argument("--bn-weight", type=float, default=1.0)
    p.add_argument("--diversity-weight", type=float, default=0.3, help="generator's mode-seeking term (0: off)")
    p.add_argument("--ablate-diversity", action="store_true", help="also train a generator without the diversity term")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.fp_epochs is None:
        args.fp_epochs = 3 if args.mnist else 20
    if args.qat_epochs is None:
        args.qat_epochs = 2 if args.mnist else 5
    if args.generator_steps is None:
        args.generator_steps = 2000 if args.mnist else 500
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_logs()
    result = run(args)
    command = rerun_command("data_free.py", argv)
    text = section(args, result, command)
    print(text)
    if not args.no_write:
        write_section(Path(args.output), HEADER, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
