"""AutoQB benchmark: channel-level vs layer-level RL bit allocation vs uniform vs QBitOpt on MNIST ResNet-8.

Every variant starts from the same float ResNet-8 (trained ``--fp-epochs`` on the MNIST training subset) and gets the
same QAT fine-tune afterwards (``--qat-epochs``, LSQ, 8-bit inputs, first and last layer at 8 bits), under one size
budget: the weights of the uniform ``--bits``-bit model (first and last layer at 8 bits), so uniform meets it exactly.

* **uniform**: every other layer at ``--bits`` bits;
* **QBitOpt**: ``BitReallocationCallback(size_budget=...)`` reallocating widths 2-8 during the fine-tune;
* **AutoQB, layer level** (HAQ's agent): ``AutoQBCallback(level="layer")``, one width per layer, widths 1-8;
* **AutoQB, channel level**: ``AutoQBCallback(level="channel")``, one width per group of ``--channels-per-unit``
  output channels (the hierarchical agent), widths 1-8 (binary included).

The two AutoQB variants run ``--episodes`` episodes each (the same agent hyper-parameters, HAQ's with the exploration
compressed to the episode count) before the fine-tune; each episode recalibrates BatchNorm and activation ranges on
``--calibration-batches`` training batches and measures accuracy on ``--eval-batches`` validation batches. Reported:
test accuracy after the fine-tune (mean ± std over ``--seeds`` seeds, and paired differences to uniform), the search's
accuracy of its best policy before the fine-tune, the episode that found it, the search time, and the share of binary
channels.

Usage::

    python benchmarks/autoqb.py                       # writes its section of BENCHMARKS.md
    python benchmarks/autoqb.py --seeds 3 --episodes 200 --train-subset 60000   # the bigger run
    python benchmarks/autoqb.py --no-write
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

import lightning as L
import torch
from common import quiet_logs, quiet_trainer, rerun_command, write_section

ROOT = Path(__file__).resolve().parents[1]
HEADER = "## AutoQB: channel-level vs layer-level RL bit allocation"
VARIANTS = ("uniform", "QBitOpt", "AutoQB layer level", "AutoQB channel level")


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from lightning_quant import AutoQBCallback, BitReallocationCallback, QuantizationAwareTraining
    from lightning_quant.allocation import layer_costs
    from lightning_quant.allocation.rl import DDPGConfig
    from lightning_quant.datamodules import MNISTDataModule
    from lightning_quant.models import ImageClassifier, resnet8
    from lightning_quant.surgery import QuantSpec, quantize_model, quantized_layers
    from lightning_quant.surgery.summary import quantization_summary

    quiet_logs()
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)

    def data(seed: int) -> MNISTDataModule:
        return MNISTDataModule(root=args.data, batch_size=128, val_size=5000, seed=seed, train_subset=args.train_subset)

    fp_path = out / f"resnet8_fp_{args.train_subset}_{args.fp_epochs}.pt"
    if not fp_path.exists():
        L.seed_everything(0)
        fp = ImageClassifier(resnet8(in_channels=1), lr=3e-3, scheduler="cosine")
        quiet_trainer(args.fp_epochs, [], out).fit(fp, data(0))
        torch.save(fp.state_dict(), fp_path)
    probe = quantize_model(resnet8(in_channels=1), QuantSpec())
    costs = layer_costs(probe)
    budget = float(8 * costs.params[costs.frozen].sum() + args.bits * costs.params[~costs.frozen].sum())
    info = {"budget": budget, "params": float(costs.params.sum()), "fp_acc": None}

    def variant(name: str, seed: int) -> dict:
        L.seed_everything(seed)
        seeded = data(seed)
        model = ImageClassifier(resnet8(in_channels=1), lr=1e-3, scheduler="cosine")
        model.load_state_dict(torch.load(fp_path))
        bits = args.bits if name == "uniform" else 8
        callbacks: list = [QuantizationAwareTraining(weight_bits=bits, act_bits=8, num_calibration_batches=4)]
        autoqb = None
        if name == "QBitOpt":
            steps = args.qat_epochs * (args.train_subset or 55000) // 128
            every = max(1, min(25, steps // 4))  # at least two reallocations before the freeze at half the steps
            callbacks.append(
                BitReallocationCallback(size_budget=budget, every_n_steps=every, freeze_after=steps // 2, plot=False)
            )
        if name.startswith("AutoQB"):
            level = "channel" if "channel" in name else "layer"
            autoqb = AutoQBCallback(
                size_budget=budget,
                episodes=args.episodes,
                level=level,
                bit_choices=list(range(1, 9)),
                channels_per_unit=args.channels_per_unit if level == "channel" else 1,
                calibration_batches=args.calibration_batches,
                eval_batches=args.eval_batches,
                ddpg=DDPGConfig.for_episodes(args.episodes, warmup_episodes=args.warmup),
                seed=seed,
                save_search=False,
                plot=False,
            )
            callbacks.append(autoqb)
        timer = _FitStartTimer()
        # a few validation batches per epoch (every variant alike): the search measures accuracy on validation batches
        trainer = quiet_trainer(args.qat_epochs, [*callbacks, timer], out, val_batches=args.eval_batches)
        start = time.perf_counter()
        trainer.fit(model, seeded)
        seconds = time.perf_counter() - start
        acc = trainer.test(model, seeded, verbose=False)[0]["test/acc"]
        widths = [
            w
            for name_, layer in quantized_layers(model).items()
            for w in layer.weight_quantizer.channel_widths().expand(layer.weight.shape[0]).tolist()
        ]
        size = sum(m.weight_quantizer.payload_bits(m.weight) for m in quantized_layers(model).values())
        row = {
            "variant": name,
            "seed": seed,
            "acc": acc,
            "size": size,
            "avg_bits": quantization_summary(model).avg_weight_bits,
            "binary": sum(w == 1 for w in widths) / len(widths),
            "seconds": seconds,
            "search_seconds": timer.seconds if autoqb is not None else None,
        }
        if autoqb is not None:
            row.update(
                best_episode=autoqb.best["episode"],
                search_acc=autoqb.best["metric"],
                reference=autoqb.reference,
                layer_bits=None if name.endswith("channel level") else autoqb.best["bits"],
            )
        return row

    rows = []
    for seed in range(args.seeds):
        for name in args.variants:
            rows.append(variant(name, seed))
            print({k: v for k, v in rows[-1].items() if k != "layer_bits"}, flush=True)
    return rows, info


class _FitStartTimer(L.Callback):
    """Wall time from ``setup`` to this callback's ``on_fit_start`` (it runs after the search's)."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._start = time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def table(rows: list[dict], info: dict) -> str:
    lines = [
        "| variant | test accuracy after fine-tune (mean ± std) | seeds | size used / budget | binary channels | "
        "search: best policy's accuracy (float) | episode of the best | search time (s) | s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        accs = [100 * r["acc"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        used = max(r["size"] for r in rs) / info["budget"]
        if "search_acc" in rs[0]:
            search = (
                f"{statistics.mean(100 * r['search_acc'] for r in rs):.2f} % "
                f"({statistics.mean(100 * r['reference'] for r in rs):.2f} %)"
            )
            episode = ", ".join(str(r["best_episode"]) for r in rs)
            search_time = f"{statistics.mean(r['search_seconds'] for r in rs):.0f}"
        else:
            search = episode = search_time = "–"
        lines.append(
            f"| {name} | {statistics.mean(accs):.2f} ± {std:.2f} % | {len(rs)} | {used:.4f} | "
            f"{100 * statistics.mean(r['binary'] for r in rs):.1f} % | {search} | {episode} | {search_time} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    lines += ["", *_paired(rows, "uniform")]
    layer_rows = [r for r in rows if r["variant"] == "AutoQB layer level" and r.get("layer_bits")]
    if layer_rows:
        lines += ["", f"Layer-level policy (seed 0, free layers in order): {layer_rows[0]['layer_bits']}."]
    return "\n".join(lines)


def _paired(rows: list[dict], baseline: str) -> list[str]:
    base = {r["seed"]: 100 * r["acc"] for r in rows if r["variant"] == baseline}
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows if r["variant"] != baseline):
        diffs = [100 * r["acc"] - base[r["seed"]] for r in rows if r["variant"] == name and r["seed"] in base]
        if diffs:
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            ahead = sum(d > 0 for d in diffs)
            out.append(
                f"- {name} − {baseline}, paired by seed: {statistics.mean(diffs):+.2f} ± {std:.2f} points "
                f"(ahead on {ahead} of {len(diffs)} seeds)."
            )
    return out


def section(args: argparse.Namespace, rows: list[dict], info: dict, command: str, minutes: float) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{load:.1f} at the end), torch {torch.__version__}, {args.threads} intra-op threads; measured "
        f"{dt.date.today().isoformat()}, {minutes:.0f} min in all"
    )
    return f"""{HEADER}

MNIST, ResNet-8 (1-channel input) from one float checkpoint ({args.fp_epochs} epochs on {args.train_subset or "all"}
training images), then the same QAT fine-tune for every variant ({args.qat_epochs} epoch(s), LSQ, 8-bit inputs, first
and last layer at 8 bits and counted) under one size budget: {info["budget"]:,.0f} bits of weights, the size of the
uniform {args.bits}-bit model. AutoQB: {args.episodes} episodes per search ({args.warmup} of warm-up), HAQ's agent
hyper-parameters with the exploration decay compressed to the episode count, widths 1-8 (binary included), channel
level in units of {args.channels_per_unit} output channels; each episode recalibrates on {args.calibration_batches}
training batches and measures accuracy on {args.eval_batches} validation batches of 128. The budget holds in every
episode by construction (the suite's budget-keeping solver projects each proposal).

```
{command}
```

Machine: {machine}.

{table(rows, info)}

Honest reading: with this few episodes and seeds the comparison is small and noisy; the search time is the agent
(one DDPG update per unit step, 300-unit layers) plus one recalibrate-and-evaluate pass per episode.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "autoqb_bench"))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--channels-per-unit", type=int, default=4)
    p.add_argument("--calibration-batches", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--fp-epochs", type=int, default=2)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    start = time.perf_counter()
    rows, info = run(args)
    text = section(args, rows, info, rerun_command("autoqb.py", argv), (time.perf_counter() - start) / 60)
    print(text)
    if not args.no_write:
        write_section(Path(args.output), HEADER, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
