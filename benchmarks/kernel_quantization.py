"""Kernel quantization benchmarks: k-means time on ResNet-18's largest conv, ResNet-18's bits per conv parameter, and
MNIST accuracy against bits per conv parameter beside uniform per-channel QAT.

Part 1 (seconds): the k-means fit that ``KernelQuantizationCallback`` runs once per layer when training starts
(:meth:`CodebookQuantizer.fit <lightning_quant.core.codebook.CodebookQuantizer.fit>`: seeded k-means++, then Lloyd
iterations), on torchvision ResNet-18's largest convolution (512 x 512 x 3 x 3: 262,144 kernels of 9 weights), for
2**index_bits entries, on the CPU. The weights are torchvision's random (Kaiming) initialisation -- no pre-trained
weights can be downloaded here. Reported: k-means++ time, Lloyd time and iterations run, and the whole fit.

Part 2 (seconds): ResNet-18's exact bits per conv parameter (:func:`kernel_quantization_report`, equal to what
``save_packed_model`` writes) for index bits 2-8, per-layer and shared codebooks, the three 1x1 downsampling convs
kept in float or as 4-bit scalar codebooks. Pure accounting: it depends on the shapes only.

Part 3 (``--mnist``): LeNet-5 and ResNet-8 trained in float (``--fp-epochs``, seed 0) on a subset of MNIST; from that
checkpoint each variant is fine-tuned for ``--epochs`` (Adam, cosine), weights only (activations stay float):

* KQ: ``KernelQuantizationCallback(index_bits)`` with 6-bit codebooks, one per layer; 1x1 convs (ResNet-8's two
  shortcuts) as 2-bit scalar codebooks; the Linear layers stay float (they are not conv parameters);
* uniform per-channel LSQ QAT of every conv (1x1 included) at 1 bit (binary) and 2 bits, the Linear layers float --
  the smallest sizes a uniform grid reaches.

For ``--seeds`` seeds: test accuracy (mean ± std, on ``--test-subset`` test images) and the exact bits per conv
parameter. The paper's mark: <= 1.7 bits per conv parameter within 1 point of float.

Usage::

    python benchmarks/kernel_quantization.py                  # parts 1-2, updates BENCHMARKS.md
    python benchmarks/kernel_quantization.py --mnist          # + part 3 (tens of minutes on a busy 2-core machine)
    python benchmarks/kernel_quantization.py --no-write       # print only
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
HEADER = "## Kernel quantization (KQ)"
PAPER_BITS = 1.7
#: convolution weights of torchvision's ResNet-18
R18_CONV_PARAMS = 11_166_912


# -- part 1: k-means time ---------------------------------------------------------------------------------------
def kmeans_timing(args: argparse.Namespace) -> tuple[str, list[dict]]:
    import torchvision

    from lightning_quant.core.codebook import CodebookQuantizer
    from lightning_quant.core.kmeans import kmeans, kmeans_plus_plus

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    name, conv = max(
        ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)),
        key=lambda item: item[1].weight.numel(),
    )
    weight = conv.weight.detach()
    points = weight.reshape(-1, 9)
    rows = []
    for bits in args.timing_bits:
        k = 2**bits
        clock = _Clock()
        init = kmeans_plus_plus(points, k, seed=0)
        plus = clock.lap()
        result = kmeans(points, init, iterations=args.kmeans_iterations)
        lloyd = clock.lap()
        q = CodebookQuantizer(weight.shape, num_entries=k, vector="kernel", codebook_bits=6)
        q.fit(weight, iterations=args.kmeans_iterations)
        fit = clock.lap()
        row = {"bits": bits, "entries": k, "kernels": points.shape[0], "iterations": result.iterations}
        row.update({"plusplus": plus, "lloyd": lloyd, "fit": fit})
        rows.append(row)
        print(rows[-1], flush=True)
    return f"{name} {tuple(weight.shape)}", rows


class _Clock:
    """Wall and CPU (process) seconds since the last lap: on a shared machine the wall time includes waiting."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return out


def timing_table(rows: list[dict]) -> str:
    lines = [
        "| index bits | entries | kernels | k-means++: wall / CPU (s) | Lloyd: wall / CPU (s) | Lloyd iterations | "
        "whole fit (the callback's): wall / CPU (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[k][0]:.2f} / {r[k][1]:.2f}" for k in ("plusplus", "lloyd", "fit")]
        lines.append(
            f"| {r['bits']} | {r['entries']} | {r['kernels']:,} | {cells[0]} | {cells[1]} | {r['iterations']} | "
            f"{cells[2]} |"
        )
    return "\n".join(lines)


# -- part 2: ResNet-18 accounting -------------------------------------------------------------------------------
def quantize_for(model: torch.nn.Module, callbacks: list) -> torch.nn.Module:
    """Quantize ``model`` with the merged requests of ``callbacks``, as their ``setup`` would (no Trainer)."""
    from lightning_quant.surgery import quantize_model
    from lightning_quant.surgery.quantize import layer_candidates
    from lightning_quant.surgery.requests import merge_requests

    requests = [cb.quantization_request(None, model) for cb in callbacks]
    return quantize_model(model, merge_requests(requests, layer_candidates(model)))


def resnet18_bits(args: argparse.Namespace) -> list[dict]:
    import torchvision

    from lightning_quant import KernelQuantizationCallback
    from lightning_quant.callbacks.kernel_quantization import kernel_quantization_report

    rows = []
    for bits in range(2, 9):
        row = {"bits": bits}
        for key, kwargs in (
            ("per_layer_float", {"pointwise": "exclude"}),
            ("per_layer", {"pointwise": "scalar", "pointwise_bits": 4, "exclude": ["fc"]}),
            ("shared", {"pointwise": "scalar", "pointwise_bits": 4, "exclude": ["fc"], "codebook": "shared"}),
        ):
            model = quantize_for(
                torchvision.models.resnet18(weights=None), [KernelQuantizationCallback(bits, **kwargs)]
            )
            row[key] = kernel_quantization_report(model).bits_per_param
        rows.append(row)
    return rows


def resnet18_table(rows: list[dict]) -> str:
    lines = [
        "| index bits | per-layer codebooks, 1x1 float | per-layer codebooks, 1x1 4-bit scalar codebooks | "
        "shared codebooks, 1x1 4-bit scalar codebooks |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['per_layer_float']:.3f} | {r['per_layer']:.3f} | {r['shared']:.3f} |")
    return "\n".join(lines)


# -- part 3: MNIST ----------------------------------------------------------------------------------------------
def _models():
    from lightning_quant.models import LeNet5, resnet8

    return {
        "LeNet-5": lambda: LeNet5(in_channels=1, num_classes=10, input_size=28),
        "ResNet-8": lambda: resnet8(in_channels=1, num_classes=10),
    }


@torch.no_grad()
def _accuracy(model: torch.nn.Module, batches: list) -> float:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return correct / total


def mnist(args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    import lightning as L
    from torch.utils.data import DataLoader, Subset

    from lightning_quant import KernelQuantizationCallback, QuantizationAwareTraining
    from lightning_quant.callbacks.kernel_quantization import kernel_quantization_report
    from lightning_quant.datamodules import MNISTDataModule
    from lightning_quant.models import ImageClassifier

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)

    def data(seed: int) -> MNISTDataModule:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=args.train_subset)

    dm = data(0)
    dm.setup("test")
    test = list(DataLoader(Subset(dm.test_dataset, range(args.test_subset)), batch_size=500))
    rows, fp_acc = [], {}
    for model_name, make in _models().items():
        fp_path = out / f"mnist_{model_name}_fp_{args.train_subset}_{args.fp_epochs}.pt"
        if not fp_path.exists():
            L.seed_everything(0)
            fp = ImageClassifier(make(), lr=3e-3, scheduler="cosine")
            quiet_trainer(args.fp_epochs, [], out).fit(fp, data(0))
            torch.save(fp.state_dict(), fp_path)
        fp = ImageClassifier(make())
        fp.load_state_dict(torch.load(fp_path))
        fp_acc[model_name] = _accuracy(fp, test)
        print({"model": model_name, "fp_acc": fp_acc[model_name]}, flush=True)
        index_bits = args.resnet_index_bits if model_name == "ResNet-8" and args.resnet_index_bits else args.index_bits
        variants = [("KQ", b) for b in index_bits] + [("uniform", b) for b in args.uniform_bits]
        for method, bits in variants:
            for seed in range(args.seeds):
                L.seed_everything(seed)
                lr = args.lr if method == "KQ" else args.uniform_lr
                model = ImageClassifier(make(), lr=lr, scheduler="cosine")
                model.load_state_dict(torch.load(fp_path))
                if method == "KQ":
                    callback = KernelQuantizationCallback(
                        bits, pointwise="scalar", pointwise_bits=2, exclude=["backbone.fc*"], seed=seed, plot=False
                    )
                else:
                    callback = QuantizationAwareTraining(
                        bits, None, binary_weights=bits == 1, exclude_types=["Linear"], first_last_bits=None,
                        num_calibration_batches=1,
                    )  # fmt: skip
                clock = _Clock()
                quiet_trainer(args.epochs, [callback], out).fit(model, data(seed))
                seconds = clock.lap()
                row = {
                    "model": model_name,
                    "method": method,
                    "bits": bits,
                    "seed": seed,
                    "acc": _accuracy(model, test),
                    "bits_per_param": kernel_quantization_report(model).bits_per_param,
                    "seconds": seconds,
                }
                rows.append(row)
                print(row, flush=True)
    return rows, fp_acc


def mnist_table(rows: list[dict], fp_acc: dict[str, float]) -> tuple[str, list[str]]:
    lines = [
        "| model | method | bits per conv parameter | test accuracy (%) | vs float (points) | seeds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    verdicts = []
    for model in fp_acc:
        lines.append(f"| {model} | float | 32 | {100 * fp_acc[model]:.2f} | | |")
        groups: dict[tuple[str, int], list[dict]] = {}
        for r in rows:
            if r["model"] == model:
                groups.setdefault((r["method"], r["bits"]), []).append(r)
        best = None
        for (method, bits), group in groups.items():
            accs = [100 * r["acc"] for r in group]
            mean = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            size = group[0]["bits_per_param"]
            label = (
                f"KQ, {bits}-bit indices"
                if method == "KQ"
                else ("uniform binary" if bits == 1 else f"uniform {bits}-bit")
            )
            lines.append(
                f"| {model} | {label} | {size:.3f} | {mean:.2f} ± {std:.2f} | {mean - 100 * fp_acc[model]:+.2f} | "
                f"{len(group)} |"
            )
            if method == "KQ" and size <= PAPER_BITS and (best is None or mean > best[1]):
                best = (bits, mean, size)
        if best is None:
            verdicts.append(f"{model}: no KQ setting at <= {PAPER_BITS} bits per conv parameter.")
        else:
            gap = 100 * fp_acc[model] - best[1]
            met = "meets" if gap <= 1.0 else "misses"
            verdicts.append(
                f"{model}: best KQ at <= {PAPER_BITS} bits per conv parameter is {best[0]}-bit indices "
                f"({best[2]:.3f} bits), {gap:.2f} points below float: {met} the paper's mark (within 1 point)."
            )
    return "\n".join(lines), verdicts


# -- the section ------------------------------------------------------------------------------------------------
def section(args, layer, timing, r18, mnist_rows, fp_acc, command: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}; measured "
        f"{dt.date.today().isoformat()} (load average {load:.2f} at the end)"
    )
    text = f"""{HEADER}

`KernelQuantizationCallback`: every k x k kernel stored as an index into a codebook of kernels on a 6-bit grid.

```
{command}
```

Machine: {machine}.

k-means fit of torchvision ResNet-18's largest convolution, `{layer}` (random Kaiming weights; at most
{args.kmeans_iterations} Lloyd iterations, stopping early when no kernel changes entry), CPU, 1 thread: what the
callback runs once per layer when training starts. Wall time includes waiting for the shared CPU; CPU time is the
process's own:

{timing_table(timing)}

ResNet-18's exact bits per conv parameter (index bits x kernels + entries x k^2 x 6 + 32 per codebook + the other
convs, over its {R18_CONV_PARAMS / 1e6:.2f} M conv weights; equal to what `save_packed_model` writes for them). The
7x7 stem has 192 kernels, so from 8 index bits its codebook is capped at 192 entries:

{resnet18_table(r18)}
"""
    if mnist_rows:
        table, verdicts = mnist_table(mnist_rows, fp_acc)
        text += f"""
MNIST (train subset {args.train_subset:,}, 5,000 held out, first {args.test_subset:,} test images); float training
{args.fp_epochs} epochs (seed 0), then {args.epochs} epoch(s) of fine-tuning per variant (Adam, cosine; lr
{args.lr} for KQ, {args.uniform_lr} for uniform QAT), weights only (activations float, the Linear layers float and
not counted). KQ: per-layer 6-bit codebooks, 1x1 convs as 2-bit scalar codebooks. Uniform: per-channel LSQ QAT of
every conv (binary: XNOR-style scales), the smallest sizes a uniform grid reaches (its float32 step size and zero
point per channel included in the size).

{table}

{chr(10).join("- " + v for v in verdicts)}

This is a short run on a shared, busy 2-core CPU ({args.epochs} fine-tuning epoch(s) of a {args.train_subset:,}-image
subset, from a float model that is itself short of convergence): the figures compare the methods at equal training,
not at convergence, and a single diverged seed shows as a large spread. LeNet-5's two convs hold only 6 and 96
kernels, so its codebooks (up to 2^b x 25 x 6 bits each) soon outweigh its indices; ResNet-8's 8,208 kernels amortise
them. For a fuller run: `python benchmarks/kernel_quantization.py --mnist --train-subset 55000 --fp-epochs 5
--epochs 3 --seeds 3 --test-subset 10000`.
"""
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", action="store_true", help="part 3: MNIST accuracy (tens of minutes on a busy 2-core CPU)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--train-subset", type=int, default=3000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "kernel_quantization_bench"))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--index-bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--resnet-index-bits", type=int, nargs="+", default=None, help="ResNet-8's (default: --index-bits)")
    p.add_argument("--uniform-bits", type=int, nargs="+", default=[1, 2])
    p.add_argument("--fp-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2, help="KQ fine-tuning (Adam)")
    p.add_argument("--uniform-lr", type=float, default=1e-3, help="uniform QAT (Adam)")
    p.add_argument("--timing-bits", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--kmeans-iterations", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_logs()
    layer, timing = kmeans_timing(args)
    r18 = resnet18_bits(args)
    print(resnet18_table(r18), flush=True)
    mnist_rows, fp_acc = mnist(args) if args.mnist else ([], {})
    text = section(args, layer, timing, r18, mnist_rows, fp_acc, rerun_command("kernel_quantization.py", argv))
    print(text)
    if not args.no_write:
        write_section(Path(args.output), HEADER, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
