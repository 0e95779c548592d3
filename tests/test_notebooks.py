"""The tutorial notebooks run top to bottom (in fast mode) in a Jupyter kernel of this Python."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"


def _execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _text_outputs(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                parts.append(output["text"])
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS][:2] == [
        "01_quickstart.ipynb",
        "02_mixed_precision_block_replacement_export.ipynb",
    ]


def test_kernel_runs_this_python():
    # the kernelspec says `python`; jupyter_client runs it as sys.executable, i.e. the venv running the tests
    command = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert command[0] == sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LQ_NOTEBOOK_FAST", "1")  # the kernel inherits the environment
    notebook = _execute(path, tmp_path)
    if path.name == "02_mixed_precision_block_replacement_export.ipynb":
        _check_mixed_precision_notebook(notebook)
        return
    if path.name == "03_threshold_tuning_and_data_free.ipynb":
        _check_threshold_tuning_data_free_notebook(notebook)
        return
    if path.name == "04_orthogonal_mixed_precision.ipynb":
        _check_ompq_notebook(notebook)
        return
    if path.name == "05_kernel_quantization.ipynb":
        _check_kernel_quantization_notebook(notebook)
        return
    if path.name == "07_mixed_precision_search.ipynb":
        _check_search_notebook(notebook)
        return
    if path.name != "01_quickstart.ipynb":
        return
    text = _text_outputs(notebook)
    fp = re.search(r"FP32 test accuracy:\s+([\d.]+)%", text)
    quantized = re.search(r"W4A4 test accuracy:\s+([\d.]+)%", text)
    assert fp and quantized, text
    # two epochs + one of QAT in fast mode; chance is 10 %
    assert float(fp.group(1)) > 50
    assert float(quantized.group(1)) > 50
    assert text.count("outputs identical: True") == 2  # from the checkpoint and from the packed file
    size = re.search(r"W4A4 size:\s+[\d.]+ KiB \(([\d.]+)x smaller\)", text)
    assert size and float(size.group(1)) > 3, text
    assert re.search(r"packed file: [\d.]+ KiB on disk", text), text


def _check_mixed_precision_notebook(notebook: nbformat.NotebookNode) -> None:
    text = _text_outputs(notebook)
    accuracies = {
        name: re.search(rf"{pattern} test accuracy:\s+([\d.]+)%", text)
        for name, pattern in (
            ("fp", "FP32"),
            ("mp", r"mixed precision \(.*\)"),
            ("qat", "W3A3 QAT"),
            ("br", r"W3A3 QAT \+ BR"),
        )
    }
    assert all(accuracies.values()), text
    # two float epochs + one of QAT in fast mode; chance is 10 %
    assert all(float(m.group(1)) > 50 for m in accuracies.values()), text
    average = re.search(r"final average weight bits: ([\d.]+)", text)
    assert average and float(average.group(1)) <= 3.0, text
    assert all(float(u) <= 1 for u in re.findall(r"budget used ([\d.]+)", text)), text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the QBitOpt allocation plot is not displayed"
    agreement = re.search(r"top-1 agreement: ([\d.]+)%", text)
    int8 = re.search(r"int8 convs: (\d+)/(\d+)", text)
    assert agreement and float(agreement.group(1)) >= 99, text
    assert int8 and int(int8.group(1)) > 0, text
    assert re.search(r"max logit diff: [\d.e+-]+", text), text
    size = re.search(r"mixed precision size: [\d.]+ KiB \(([\d.]+)x smaller", text)
    assert size and float(size.group(1)) > 5, text


def _check_threshold_tuning_data_free_notebook(notebook: nbformat.NotebookNode) -> None:
    text = _text_outputs(notebook)
    accuracies = {
        name: re.search(rf"{pattern} test accuracy:\s+([\d.]+)%", text)
        for name, pattern in (
            ("fp", "FP32"),
            ("w8_calibration", "W8A8 min-max calibration"),
            ("w8_fat", "W8A8 FAT"),
            ("w4_calibration", "W4A4 min-max calibration"),
            ("w4_fat", "W4A4 FAT"),
            ("data_free", "data-free W4A4"),
        )
    }
    assert all(accuracies.values()), text
    accuracy = {name: float(m.group(1)) for name, m in accuracies.items()}
    # two float epochs, a few FAT steps, one epoch of data-free QAT in fast mode; chance is 10 %
    assert all(value > 50 for value in accuracy.values()), text
    assert abs(accuracy["w8_fat"] - accuracy["fp"]) <= 5, text  # W8A8 FAT keeps the float accuracy, without labels
    assert len(re.findall(r"W[48]A[48] FAT wall time: [\d.]+ s", text)) == 2, text
    noise = re.search(r"Gaussian-noise W4A4 test accuracy:\s+([\d.]+)%", text)
    assert noise and 0 <= float(noise.group(1)) <= 100, text  # the floor: no lower bound
    generated = re.search(r"teacher accuracy on generated samples:\s+([\d.]+)%", text)
    assert generated and float(generated.group(1)) > 30, text  # the generator learned the labels (chance: 10 %)
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the alpha/beta plot and the grid of generated samples are not both displayed"


def _check_ompq_notebook(notebook: nbformat.NotebookNode) -> None:
    text = _text_outputs(notebook)
    accuracies = {
        name: re.search(rf"{pattern} test accuracy:\s+([\d.]+)%", text)
        for name, pattern in (("fp", "FP32"), ("ompq", "OMPQ W3-average"), ("uniform", "uniform W3"))
    }
    assert all(accuracies.values()), text
    # two float epochs + one of QAT in fast mode; chance is 10 %
    assert all(float(m.group(1)) > 50 for m in accuracies.values()), text
    used = re.search(r"average weight bits ([\d.]+) of 3.0 \(budget used ([\d.]+)\)", text)
    assert used and float(used.group(1)) <= 3.0 and float(used.group(2)) <= 1.0, text
    assert re.search(r"allocation wall time: [\d.]+ s", text), text
    assert "monotone in the budget: True" in text, text
    assert len(re.findall(r"batch \d:  [\d ]+", text)) == 3, text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the OMPQ allocation plot is not displayed"


def _check_kernel_quantization_notebook(notebook: nbformat.NotebookNode) -> None:
    text = _text_outputs(notebook)
    fp = re.search(r"FP32 test accuracy:\s+([\d.]+)%", text)
    kq = re.search(r"KQ \(4-bit indices, per-layer codebooks\) test accuracy:\s+([\d.]+)%", text)
    shared = re.search(r"KQ shared codebook test accuracy:\s+([\d.]+)%", text)
    assert fp and kq and shared, text
    assert float(fp.group(1)) > 50, text  # two float epochs in fast mode; chance is 10 %
    # fast mode fine-tunes the codebooks for one short epoch: the accuracies are printed, not judged
    moved = re.search(r"codebooks that moved during fine-tuning: (\d+)/(\d+); indices unchanged: (\d+)/(\d+)", text)
    assert moved and moved.group(1) == moved.group(2) == moved.group(3) == moved.group(4), text
    assert "packed file matches: True" in text, text
    bits = re.search(r"bits per conv parameter: per-layer ([\d.]+), shared ([\d.]+)", text)
    assert bits and float(bits.group(2)) < float(bits.group(1)) < 1.0, text
    agreement = re.search(r"onnxruntime vs PyTorch top-1 agreement: ([\d.]+)%", text)
    assert agreement and float(agreement.group(1)) >= 99.9, text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the codebook plot is not displayed"


def _check_search_notebook(notebook: nbformat.NotebookNode) -> None:
    text = _text_outputs(notebook)
    trials = re.findall(r"trial \d+: (\w+)\s", text)
    assert trials.count("COMPLETE") == 4, text  # fast mode: four trials
    assert "every trial within the budget: True" in text, text
    assert "| trial | origin | architecture |" in text, text
    sizes = re.search(r"size reported by the search: ([\d.]+) KiB, size of the fine-tuned model: ([\d.]+) KiB", text)
    assert sizes and sizes.group(1) == sizes.group(2), text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the Pareto front plot is not displayed"
