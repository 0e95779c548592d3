"""The quick start: `run()` figures, the packed model, argument checks, and its command lines."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantizationConfigError
from lightning_quant.cli import main as cli_main
from lightning_quant.export import load_packed
from lightning_quant.quickstart import run

FIGURES = (
    "fp_accuracy",
    "quantized_accuracy",
    "reloaded_accuracy",
    "fp32_bytes",
    "quantized_bytes",
    "packed_bytes",
    "packed_payload_bytes",
    "compression",
    "file_compression",
    "avg_weight_bits",
    "packed_reload_accuracy",
    "seconds",
    "output_dir",
    "packed_path",
    "checkpoint_path",
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is as fast, and does not crawl when the CPU is shared (`run` sets this itself)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short quick start (3 + 2 epochs), shared by the tests that only read its figures."""
    output = tmp_path_factory.mktemp("quickstart")
    return run(epochs_fp=3, epochs_qat=2, output_dir=output, verbose=False)


@pytest.mark.slow
def test_short_run_learns_and_shrinks_the_model(short_run):
    assert set(FIGURES) <= set(short_run)
    # ten classes: chance is 10 %
    assert short_run["fp_accuracy"] > 0.8
    assert short_run["quantized_accuracy"] > 0.8
    # W4A4 (first/last layer 8-bit), every float32 side tensor included; the file with its header too
    assert short_run["packed_payload_bytes"] < short_run["fp32_bytes"] / 5
    assert short_run["packed_payload_bytes"] < short_run["packed_bytes"] < short_run["fp32_bytes"] / 3
    assert short_run["compression"] == pytest.approx(short_run["fp32_bytes"] / short_run["packed_payload_bytes"])
    assert short_run["file_compression"] == pytest.approx(short_run["fp32_bytes"] / short_run["packed_bytes"])
    assert 4 <= short_run["avg_weight_bits"] < 4.5
    # the packed tensors are what quantization_summary counts, up to rounding each layer to whole bytes
    assert 0 <= short_run["packed_payload_bytes"] - short_run["quantized_bytes"] < 16


@pytest.mark.slow
def test_short_run_saves_a_model_that_reloads_exactly(short_run):
    # a fresh float model, from the packed file and from the checkpoint, computes what the trained one did
    assert short_run["packed_reload_accuracy"] == short_run["quantized_accuracy"]
    assert short_run["reloaded_accuracy"] == short_run["quantized_accuracy"]
    for key in ("packed_path", "checkpoint_path"):
        assert short_run[key].startswith(short_run["output_dir"])
    packed = load_packed(short_run["packed_path"])
    assert packed["backbone.layer1.0.conv1.weight"]["bits"] == 4
    assert packed["backbone.conv1.weight"]["bits"] == 8  # the first layer stays at 8 bits
    assert Path(short_run["packed_path"]).stat().st_size == short_run["packed_bytes"]


@pytest.mark.slow
def test_run_is_reproducible(short_run, tmp_path):
    again = run(epochs_fp=3, epochs_qat=2, output_dir=tmp_path, verbose=False)
    for key in ("fp_accuracy", "quantized_accuracy", "packed_bytes", "quantized_bytes"):
        assert again[key] == short_run[key], key


@pytest.mark.slow
def test_command_line_prints_the_report(tmp_path, capsys):
    status = cli_main(
        ["quickstart", "--epochs-fp", "1", "--epochs-qat", "1", "--model", "lenet5", "--output", str(tmp_path)]
    )
    assert status == 0
    out = capsys.readouterr().out
    for text in (
        "FP32 test accuracy",
        "W4A4 test accuracy",
        "FP32 size",
        "W4A4 size",
        "W4A4 packed file",
        "reload check",
    ):
        assert text in out
    assert "passed" in out
    assert str(tmp_path) in out
    assert (tmp_path / "model_w4a4.lqpack").is_file()


def test_run_restores_threads_logging_and_torch_flags(tmp_path):
    torch.set_num_threads(2)  # `run` trains on one thread, then gives the caller's setting back
    level = logging.getLogger("lightning.pytorch").level
    with pytest.raises(QuantizationConfigError):
        run(epochs_fp=1, epochs_qat=1, weight_bits=9, output_dir=tmp_path)
    deterministic = torch.are_deterministic_algorithms_enabled()
    run(epochs_fp=1, epochs_qat=1, model="lenet5", image_size=8, output_dir=tmp_path, verbose=False)
    assert torch.get_num_threads() == 2
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # Trainer(deterministic=True) is undone
    assert logging.getLogger("lightning.pytorch").level == level


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 9}, r"`weight_bits` must be within \[2, 8\], got 9"),
        ({"act_bits": 1}, r"`act_bits` must be within \[2, 8\], got 1"),
        ({"epochs_fp": 0}, r"`epochs_fp` must be an integer >= 1, got 0\. HINT: pass e\.g\. `epochs_fp=15`"),
        ({"epochs_qat": 1.5}, r"`epochs_qat` must be an integer >= 1, got 1\.5\. HINT: pass e\.g\. `epochs_qat=8`"),
        ({"model": "vgg16"}, r"`model` must be one of \['resnet8', 'lenet5'\], got 'vgg16'"),
        ({"lr": 0}, r"`lr` must be a finite number > 0, got 0\. HINT: pass e\.g\. `lr=3e-3`"),
        ({"num_threads": 0}, r"`num_threads` must be an integer >= 1 or None, got 0\. HINT: pass 1, or None"),
    ],
)
def test_run_rejects_bad_arguments_before_training(kwargs, message, tmp_path):
    with pytest.raises(QuantizationConfigError, match=message):
        run(output_dir=tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_quant.quickstart", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "--epochs-qat" in result.stdout


def _readme_python_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return [block for block in blocks if "import " in block]  # the self-contained examples


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
@pytest.mark.filterwarnings("ignore:Starting from v1.9.0, `tensorboardX`")
@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_readme_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their files into the working directory
    # shorter runs than the README's: one epoch, two search trials
    code = _readme_python_blocks()[index].replace("max_epochs=10", "max_epochs=1").replace("n_trials=20", "n_trials=2")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
