"""Export agreement on the real MNIST test set (10,000 images), for every recipe the issue names."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lightning_quant.datamodules import MNISTDataModule
from lightning_quant.export import export_onnx, verify_onnx
from lightning_quant.models import LeNet5, resnet8
from lightning_quant.surgery import LayerSpec, QuantSpec, calibrate, quantize_model, quantized_layers

pytestmark = pytest.mark.slow

RECIPES = {
    "w8a8": QuantSpec(default=LayerSpec(weight_bits=8, act_bits=8)),
    "w4a4": QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4)),
    "mixed": QuantSpec(default=LayerSpec(weight_bits=8, act_bits=8)),  # widths set per layer below
    "w8a8r": QuantSpec(default=LayerSpec(weight_bits=8, act_bits=8), quantize_residuals=True),
}


#: top-1 agreement required; 99.9 % except where 8-bit activations meet float rounding. For ResNet-8 at W8A8 the
#: exported graph folds BatchNorm (the PyTorch model does not) and onnxruntime requantizes in integers: float
#: rounding moves activations that sit on a rounding boundary by one step, and on this calibrated-only model
#: 0.17-0.20 % of the 10,000 MNIST predictions are close enough to a tie to flip (measured: 99.80 %, 99.83 %;
#: ORT without graph optimisation, i.e. the QDQ graph in float, 99.91 %). Sub-8-bit recipes export as an exact
#: float clamp and agree fully.
MIN_AGREEMENT = {("resnet8", "w8a8"): 0.998, ("resnet8", "w8a8r"): 0.998}


@pytest.fixture(scope="module")
def mnist(request) -> MNISTDataModule:
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {root} (the ../shared folder beside the project)")
    dm = MNISTDataModule(root=root, batch_size=64, val_size=5000, seed=0, train_subset=8000)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.fixture(scope="module")
def trained(mnist):
    """LeNet-5 and ResNet-8 trained two float epochs on 8,000 MNIST images (cached for the module)."""
    models = {}
    for arch in ("lenet", "resnet8"):
        torch.manual_seed(0)
        model = LeNet5(in_channels=1, input_size=28) if arch == "lenet" else resnet8(in_channels=1)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for x, y in itertools.chain(mnist.train_dataloader(), mnist.train_dataloader()):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        # re-estimate the BatchNorm statistics of the final weights (exact averages, not the lagging EMA)
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.reset_running_stats()
            bn.momentum = None
        with torch.no_grad():
            for x, _ in mnist.train_dataloader():
                model(x)
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in mnist.val_dataloader())
        assert correct / 5000 > 0.93, f"{arch} float accuracy {correct / 5000:.2%}: the trained models are the premise"
        models[arch] = {k: v.clone() for k, v in model.state_dict().items()}
    return models


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", ["lenet", "resnet8"])
def test_onnxruntime_agrees_on_the_mnist_test_set(arch, recipe, mnist, trained, tmp_path) -> None:
    torch.set_num_threads(1)
    model = LeNet5(in_channels=1, input_size=28) if arch == "lenet" else resnet8(in_channels=1)
    model.load_state_dict(trained[arch])
    quantize_model(model, RECIPES[recipe])
    if recipe == "mixed":
        for layer, bits in zip(
            list(quantized_layers(model).values())[1:-1], itertools.cycle((3, 5, 2, 6, 4)), strict=False
        ):
            layer.weight_quantizer.bits = bits
            layer.input_quantizer.bits = 6 if bits < 4 else 8
    calibrate(model, itertools.islice(mnist.train_dataloader(), 4))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))
    result = verify_onnx(model, path, mnist.test_dataloader())
    assert result.num_samples == 10_000
    assert result.agreement >= MIN_AGREEMENT.get((arch, recipe), 0.999), str(result)
    assert result.torch_accuracy > 0.8 and abs(result.torch_accuracy - result.onnx_accuracy) <= 0.001, str(result)
    if recipe in ("w8a8r",) or (recipe == "w8a8" and arch == "lenet"):
        assert result.float_convs == 0, str(result)  # every conv runs in int8
