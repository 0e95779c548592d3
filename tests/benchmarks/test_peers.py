"""The peer rows of the benchmark suite (benchmarks/suite/peers.py) on the 16x16 digits, LeNet-5, 1 epoch each.

torch.ao ships with torch and always runs; Brevitas and NNCF are bench-only packages (benchmarks/requirements.txt)
that CI does not install, so their cases skip there.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from benchmarks.common import quiet_trainer
from benchmarks.suite.peers import NOT_INSTALLED, PEER_BITS, PEERS, PeerRow, run_peer
from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.models import ImageClassifier, LeNet5

_IMPORTS = {"Brevitas": "brevitas", "NNCF": "nncf", "torch.ao": "torch.ao.quantization"}


def _backbone() -> LeNet5:
    return LeNet5(in_channels=1, num_classes=10, input_size=16)


def _datamodule(seed: int) -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, image_size=16, seed=seed)


@pytest.fixture(scope="module")
def float_state(tmp_path_factory) -> dict[str, torch.Tensor]:
    """A LeNet-5 trained in float for one epoch (the teacher the peers start from)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.seed_everything(0, verbose=False)
        model = ImageClassifier(_backbone(), lr=1e-2, scheduler="cosine")
        quiet_trainer(1, [], tmp_path_factory.mktemp("float")).fit(model, datamodule=_datamodule(0))
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def _run(peer: str, bits: int, float_state: dict, workdir: Path) -> PeerRow:
    return run_peer(
        peer,
        bits,
        make_backbone=_backbone,
        float_state=float_state,
        make_datamodule=_datamodule,
        epochs=1,
        lr=1e-3,
        seed=0,
        workdir=workdir,
    )


def test_torch_ao_trains_to_well_above_chance(float_state, tmp_path, one_thread):
    row = _run("torch.ao", 8, float_state, tmp_path)
    assert row.reason is None
    assert row.accuracy is not None and row.accuracy > 0.5  # 10 classes: chance is 0.1
    assert (row.peer, row.bits, row.seed, row.version) == ("torch.ao", 8, 0, torch.__version__)
    assert row.seconds > 0
    assert row.note is None  # LeNet-5 has no residual addition left in float


@pytest.mark.parametrize("peer", PEERS)
def test_a_peer_that_cannot_be_imported_gives_a_row_with_the_reason(peer, float_state, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, _IMPORTS[peer], None)  # `import` of it now raises ImportError
    row = _run(peer, PEER_BITS[peer][0], float_state, tmp_path)
    assert row == PeerRow(peer, None, PEER_BITS[peer][0], 0, None, NOT_INSTALLED, 0.0)


def test_a_peer_that_fails_gives_a_row_with_the_exception(float_state, tmp_path, one_thread):
    broken = dict(float_state)
    del broken["fc3.bias"]
    row = _run("torch.ao", 8, broken, tmp_path)
    assert row.accuracy is None
    assert row.version == torch.__version__
    assert row.reason.startswith("RuntimeError: Error(s) in loading state_dict for LeNet5")
    assert "\n" not in row.reason


def test_bad_arguments_are_refused_before_any_work(float_state, tmp_path):
    with pytest.raises(ValueError, match=r"`peer` must be one of .*, got 'TensorRT'"):
        _run("TensorRT", 8, float_state, tmp_path)
    with pytest.raises(ValueError, match=r"`bits` for NNCF must be one of \(8,\), got 4"):
        _run("NNCF", 4, float_state, tmp_path)


def test_brevitas_quantizes_every_layer_at_its_width_with_learned_scales(one_thread):
    pytest.importorskip("brevitas")
    from benchmarks.suite.peers import _brevitas

    model = _brevitas(_backbone(), 2, _datamodule(0), first_last_bits=8)
    model(torch.randn(8, 1, 16, 16))  # the first forward initialises the weight scales from the weights
    widths = {}
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        layer = model.get_submodule(name)
        weight = layer.quant_weight()
        codes = torch.round(weight.value / weight.scale)
        widths[name] = (int(weight.bit_width), int(layer.input_quant.bit_width()), codes.min().item())
        assert weight.scale.shape[0] == layer.weight.shape[0]  # one scale per output channel
    # full signed grid (-2 at 2 bits, as LSQ's), first and last layer at 8 bits
    assert widths == {
        "conv1": (8, 8, -128),
        "conv2": (2, 2, -2),
        "fc1": (2, 2, -2),
        "fc2": (2, 2, -2),
        "fc3": (8, 8, -128),
    }
    scales = [n for n, p in model.named_parameters() if n.endswith("scaling_impl.value") and p.requires_grad]
    assert len(scales) == 10  # a learned weight scale and a learned input scale per layer


@pytest.mark.parametrize("bits", [8, 2])
def test_brevitas_runs(bits, float_state, tmp_path, one_thread):
    pytest.importorskip("brevitas")
    row = _run("Brevitas", bits, float_state, tmp_path)
    assert row.reason is None and row.version is not None
    assert row.accuracy is not None and row.accuracy > (0.5 if bits == 8 else 0.2)


def test_nncf_runs(float_state, tmp_path, one_thread):
    pytest.importorskip("nncf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = _run("NNCF", 8, float_state, tmp_path)
    # nncf.quantize returns a model in eval mode: it must be trained in training mode, as a fresh model is
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]
    assert row.reason is None and row.version is not None
    assert row.accuracy is not None and row.accuracy > 0.5
