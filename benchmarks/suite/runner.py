"""``python -m benchmarks run``: teachers, every technique from them, the peers, plots and BENCHMARKS.md.

The run, in order: (1) one float teacher per model, trained to convergence once and cached by its configuration;
(2) every technique of :mod:`benchmarks.suite.methods` at every width and seed, from that teacher; (3) the peers'
QAT (:mod:`benchmarks.suite.peers`: Brevitas, NNCF, torch.ao) on the same model, data, widths, epochs and seeds;
(4) the report: BENCHMARKS.md sections, PNG plots and the paper-vs-here table (:mod:`benchmarks.suite.report`).
Every run's result is cached (``--cache-dir``), so an interrupted suite resumes where it stopped. The
per-technique scripts (``benchmarks/*.py``, each writing its own section) run too with ``--with-scripts`` or when
named in ``--only``.

Usage::

    python -m benchmarks run --quick                  # digits, ~10 minutes on 2 CPU cores
    python -m benchmarks run                          # MNIST (needs a local copy, --data-root), hours on a CPU
    python -m benchmarks run --only teachers techniques --seeds 3 --train-subset 10000
    python -m benchmarks run --dataset cifar10 --data-root ~/data --accelerator gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite.config import (
    DEFAULT_CACHE,
    DEFAULT_DATA_ROOT,
    MODELS,
    PRESETS,
    ROOT,
    RunCache,
    Settings,
    backbone_factory,
    datamodule_factory,
)
from benchmarks.suite.methods import METHODS, Context, run_method
from benchmarks.suite.teachers import Teacher, get_teacher

PARTS = ("teachers", "techniques", "peers", "papers")
# the per-technique scripts and their full-run arguments; each writes its own BENCHMARKS.md section
SCRIPTS = {
    "qat_step_time": ["qat_step_time.py"],
    "export_latency": ["export_latency.py"],
    "qbitopt": ["qbitopt.py", "--mnist"],
    "ompq": ["ompq.py", "--mnist"],
    "kernel_quantization": ["kernel_quantization.py", "--mnist"],
    "incremental_quantization": ["incremental_quantization.py", "--seeds", "2", "--train-subset", "0"],
    "mixed_precision_search": ["mixed_precision_search.py"],
    "autoqb": ["autoqb.py"],
    "zoo_int8": ["zoo_int8.py"],
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite and write BENCHMARKS.md and its plots")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="digits, 2 widths, 2 seeds: about 10 minutes on 2 cores")
    size.add_argument("--toy", action="store_true", help="a few batches of everything (the suite's smoke test)")
    run.add_argument("--only", nargs="+", choices=[*PARTS, *SCRIPTS], help="run only these parts / scripts")
    run.add_argument("--with-scripts", action="store_true", help="also run every per-technique script (hours)")
    run.add_argument("--dataset", choices=("mnist", "digits", "cifar10"), help="override the preset's data set")
    run.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder with MNIST/raw or the CIFAR-10 copy")
    run.add_argument("--accelerator", default="auto", help="'auto' (a GPU when present), 'cpu', 'gpu'")
    run.add_argument("--models", nargs="+", choices=MODELS)
    run.add_argument("--bits", type=int, nargs="+", help="W=A widths of the technique comparison")
    run.add_argument("--seeds", type=int)
    run.add_argument("--qat-epochs", type=int)
    run.add_argument("--train-subset", type=int, help="training images of the fine-tunes (0: all)")
    run.add_argument("--generator-steps", type=int, help="ZS-CGAN generator steps (default: the preset's)")
    run.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    run.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="cached teachers and run results")
    run.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    run.add_argument("--plots-dir", default=str(ROOT / "benchmarks" / "plots"))
    run.add_argument("--no-write", action="store_true", help="print the sections instead of writing them")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = PRESETS["quick" if args.quick else "toy" if args.toy else "full"]
    overrides: dict[str, Any] = {}
    for name in ("dataset", "models", "bits", "seeds", "qat_epochs", "train_subset", "generator_steps"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(value) if isinstance(value, list) else value
    if overrides.get("train_subset") == 0:
        overrides["train_subset"] = None  # 0: every training image
    return dataclasses.replace(settings, **overrides)


def resolve_accelerator(name: str) -> str:
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def progress(items: list, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="run", dynamic_ncols=True)


def run_techniques(
    settings, teachers, cache, data_root, workdir, accelerator, extra_bits, comparison: bool = True
) -> list[dict]:
    """Every (model, method, bits, seed) of the comparison (``comparison``), plus LSQ QAT at the peers' widths and
    seeds (``extra_bits``); cached."""
    planned = []
    for model in settings.models:
        if comparison:
            for bits in sorted(set(settings.bits)):
                for seed in range(settings.seeds):
                    planned += [(model, method, bits, seed) for method in METHODS]
        for bits in sorted(set(extra_bits) - (set(settings.bits) if comparison else set())):
            planned += [(model, "LSQ QAT", bits, seed) for seed in range(settings.peer_seeds)]
    contexts: dict[str, Context] = {}
    rows = []
    for model, method, bits, seed in progress(planned, "techniques"):
        teacher: Teacher = teachers[model]
        config = {
            "kind": "technique", "settings": settings.run_key(uses_generator=method == "QAT + KD (ZS-CGAN data)"),
            "model": model, "method": method, "bits": bits, "seed": seed, "teacher": teacher.key,
        }  # fmt: skip
        result = cache.get(config)
        if result is None:
            if model not in contexts:
                contexts[model] = Context(settings, model, backbone_factory(model, settings.dataset), teacher.state,
                                          datamodule_factory(settings, data_root), workdir, accelerator)  # fmt: skip
            result = run_method(contexts[model], method, bits, seed) or {"skipped": True}
            cache.put(config, result)
        if not result.get("skipped"):
            rows.append({"model": model, "method": method, "bits": bits, "seed": seed, **result})
    return rows


def run_peers(settings, teachers, cache, data_root, workdir, accelerator) -> list[dict]:
    from benchmarks.suite.peers import PEER_BITS, PEERS, run_peer

    planned = [
        (model, peer, bits, seed)
        for model in settings.models
        for peer in PEERS
        for bits in PEER_BITS[peer]
        for seed in range(settings.peer_seeds)
    ]
    rows = []
    for model, peer, bits, seed in progress(planned, "peers"):
        teacher = teachers[model]
        config = {
            "kind": "peer", "settings": settings.run_key(),
            "model": model, "peer": peer, "bits": bits, "seed": seed, "teacher": teacher.key,
        }  # fmt: skip
        result = cache.get(config)
        if result is None or result.get("accuracy") is None:  # a peer that could not run is tried again
            row = run_peer(
                peer, bits, make_backbone=backbone_factory(model, settings.dataset), float_state=teacher.state,
                make_datamodule=datamodule_factory(settings, data_root), epochs=settings.qat_epochs,
                lr=settings.qat_lr, seed=seed, accelerator=accelerator, workdir=workdir,
            )  # fmt: skip
            result = cache.put(config, dataclasses.asdict(row))
        rows.append({"model": model, **{k: v for k, v in result.items() if k != "config"}})
    return rows


def run_scripts(names: list[str], no_write: bool, output: Path) -> list[tuple[str, int, float]]:
    """Run each named per-technique script in its own process (each writes its own section)."""
    done = []
    for name in progress(names, "scripts"):
        script, *script_args = SCRIPTS[name]
        command = [sys.executable, str(ROOT / "benchmarks" / script), *script_args]
        command += ["--no-write"] if no_write else []
        start = time.perf_counter()
        status = subprocess.call(command, cwd=ROOT)
        done.append((name, status, time.perf_counter() - start))
    return done


def main(argv: list[str] | None = None) -> int:
    """Run the suite (see the module docs); logging, warning filters and torch's thread count are restored after."""
    from benchmarks.common import quieted

    threads = torch.get_num_threads()
    try:
        with quieted():
            return _run(sys.argv[1:] if argv is None else list(argv))
    finally:
        torch.set_num_threads(threads)


def _run(argv: list[str]) -> int:
    from benchmarks.suite import report

    args = parse(argv)
    settings = settings_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = resolve_accelerator(args.accelerator)
    selected = set(args.only or PARTS)
    scripts = [s for s in SCRIPTS if s in selected] or (list(SCRIPTS) if args.with_scripts else [])
    parts = [p for p in PARTS if p in selected]
    cache = RunCache(Path(args.cache_dir))
    workdir = cache.root / "lightning_logs"
    data_root = Path(args.data_root).expanduser()
    started = time.perf_counter()

    teachers, rows, peer_rows = {}, [], []
    if {"teachers", "techniques", "peers", "papers"} & set(parts):
        for model in progress(list(settings.models), "teachers"):
            teachers[model] = get_teacher(settings, model, cache, data_root, workdir, accelerator)
    if {"techniques", "peers", "papers"} & set(parts):
        peer_bits = (2, 4, 8) if "peers" in parts else ()
        comparison = bool({"techniques", "papers"} & set(parts))  # --only peers: just our rows beside the peers'
        rows = run_techniques(settings, teachers, cache, data_root, workdir, accelerator, peer_bits, comparison)
    if "peers" in parts:
        peer_rows = run_peers(settings, teachers, cache, data_root, workdir, accelerator)
    minutes = (time.perf_counter() - started) / 60
    if parts:
        fits = [t.seconds for t in teachers.values()] + [r["seconds"] for r in [*rows, *peer_rows]]
        context = report.RunInfo(settings, argv, accelerator, minutes, sum(fits) / 60)
        sections = report.sections(context, teachers, rows, peer_rows, parts, Path(args.plots_dir), Path(args.output))
        for header, text in sections:
            if args.no_write:
                print(text + "\n")
            else:
                from benchmarks.common import write_section

                write_section(Path(args.output), header, text)
    for name, status, seconds in run_scripts(scripts, args.no_write, Path(args.output)):
        print(f"{name}: exit {status} after {seconds / 60:.1f} min", flush=True)
    return 0
