"""Smoke test of the benchmark suite (``python -m benchmarks run``) at toy size, and its statistics."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from benchmarks.suite import report
from benchmarks.suite.runner import main
from tests.conftest import write_cifar10


def test_verdict_follows_the_paired_differences():
    assert report.verdict([0.5, 0.2, -0.1], "ahead") == "yes"
    assert report.verdict([-0.5, -0.2, 0.1], "ahead") == "no"
    assert report.verdict([1.0, -0.2, -0.3], "ahead") == "unclear (within seed noise)"
    assert report.verdict([-0.8], "within 1 point") == "yes"
    assert report.verdict([-1.5], "within 1 point") == "no"
    assert report.verdict([], "ahead") == "not measured"


def test_paired_differences_pair_by_seed():
    rows = [
        {"model": "m", "bits": 4, "method": "A", "seed": 0, "accuracy": 0.90},
        {"model": "m", "bits": 4, "method": "A", "seed": 1, "accuracy": 0.80},
        {"model": "m", "bits": 4, "method": "B", "seed": 1, "accuracy": 0.85},
        {"model": "m", "bits": 4, "method": "B", "seed": 0, "accuracy": 0.88},
        {"model": "m", "bits": 2, "method": "B", "seed": 2, "accuracy": 0.10},
    ]
    assert report.paired(rows, "m", 4, "B", "A") == pytest.approx([-2.0, 5.0])


def test_toy_suite_writes_sections_and_plots_and_resumes_from_its_cache(tmp_path):
    output, plots, cache = tmp_path / "BENCHMARKS.md", tmp_path / "plots", tmp_path / "cache"
    argv = ["run", "--toy", "--threads", "1", "--cache-dir", str(cache), "--plots-dir", str(plots)]
    argv += ["--output", str(output), "--only", "teachers", "techniques", "papers"]
    level, threads = logging.getLogger("lightning_quant").level, torch.get_num_threads()
    assert main(argv) == 0
    # nothing leaks into the calling process (the tests that follow read lightning_quant's logs)
    assert logging.getLogger("lightning_quant").level == level and torch.get_num_threads() == threads
    text = output.read_text()
    for title in ("## Suite (toy, digits): teachers and techniques", "## Suite (toy, digits): paper vs here"):
        assert title in text
    table = text.split("| method | W4A4 | avg. weight bits |")[1].split("\n\n")[0]
    for method in ("LSQ QAT", "QAT + BR", "QAT + QBitOpt", "PTQ (min/max)", "FAT", "QAT + KD (ZS-CGAN data)"):
        assert re.search(rf"\| {re.escape(method)} \| \d+\.\d\d ± \d\.\d\d \| \d\.\d\d \|", table), method
    assert str(tmp_path) not in text  # the command is shown without this machine's paths
    for name in ("pareto", "allocations", "step_time"):
        png = plots / f"{name}_toy_digits.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}_toy_digits.png" in text

    # a second run trains nothing: the same results from the cache
    cached = sorted(p.name for p in cache.glob("*.json"))
    output.write_text("# Benchmarks\n")
    assert main(argv) == 0
    assert sorted(p.name for p in cache.glob("*.json")) == cached
    again = output.read_text()
    assert table in again
    assert "s (cached) |" in again


def test_toy_suite_runs_unchanged_on_a_local_cifar10_copy(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=8, n_test=8)
    output = tmp_path / "BENCHMARKS.md"
    argv = ["run", "--toy", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--threads", "1"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--plots-dir", str(tmp_path / "plots"), "--output", str(output)]
    assert main([*argv, "--only", "teachers", "techniques"]) == 0
    text = output.read_text()
    assert "## Suite (toy, cifar10): teachers and techniques" in text
    assert re.search(r"\| LSQ QAT \| \d+\.\d\d ± \d\.\d\d \|", text)


def test_generator_steps_change_only_the_generated_data_runs_cache_key():
    import dataclasses

    from benchmarks.suite.config import PRESETS

    a = PRESETS["toy"]
    b = dataclasses.replace(a, generator_steps=a.generator_steps + 1)
    assert a.run_key() == b.run_key()
    assert a.run_key(uses_generator=True) != b.run_key(uses_generator=True)
    assert a.run_key() != dataclasses.replace(a, qat_epochs=a.qat_epochs + 1).run_key()
