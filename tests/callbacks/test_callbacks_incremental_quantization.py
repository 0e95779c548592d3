"""IncrementalQuantizationCallback (SLQ/MLQ): exact stage fractions, frozen weights that never move, codebook-valued
final weights with an exact 0, k-means against scikit-learn, composition with QAT, resume, bad input."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.cluster import KMeans
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    IncrementalQuantizationCallback,
    QuantizationAwareTraining,
    QuantizationConfigError,
    QuantSpec,
    dequantize_model,
)
from lightning_quant.callbacks.incremental_quantization import (
    PLOT_NAME,
    codebook_entries,
    freeze_order,
    frozen_target,
    magnitude_ranks,
)
from lightning_quant.core.codebook import CodebookQuantizer, power_of_two_entries
from lightning_quant.core.kmeans import kmeans
from lightning_quant.export.packing import load_packed_model, save_packed_model
from lightning_quant.models import ImageClassifier, LeNet5
from lightning_quant.surgery import is_quantized, load_quantized, quantized_layers
from tests.conftest import crash_and_resume, shipped_config


def _loader(n: int = 32, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _lenet(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    # SGD with momentum and weight decay: both would move frozen weights if anything let them
    return ImageClassifier(LeNet5(), lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.05)


class Probe(Callback):
    """At the end of every epoch: each codebook layer's frozen mask, forward weight, float weight and entries."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, tuple[torch.Tensor, ...]]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        record = {}
        for name, layer in quantized_layers(pl_module).items():
            q = layer.weight_quantizer
            if isinstance(q, CodebookQuantizer):
                record[name] = (
                    q.frozen_vector_mask.clone(),
                    layer.quantized_weight().detach().flatten().clone(),
                    layer.weight.detach().flatten().clone(),
                    q.effective_codebook().detach().flatten().clone(),
                )
        self.epochs.append(record)


def _lloyd_fixed_zero(x: np.ndarray, centres: np.ndarray, iterations: int) -> tuple[np.ndarray, float]:
    """Independent reference: Lloyd's algorithm on scalars with centre 0 fixed (float64)."""
    c = centres.astype(np.float64).copy()
    for _ in range(iterations):
        labels = np.argmin((x[:, None] - c[None]) ** 2, axis=1)
        for j in range(1, len(c)):
            if (labels == j).any():
                c[j] = x[labels == j].mean()
    labels = np.argmin((x[:, None] - c[None]) ** 2, axis=1)
    return c, float(((x - c[labels]) ** 2).sum())


# -- the schedule, frozen weights, final codebook ---------------------------------------------------------------
def test_slq_stages_freeze_the_scheduled_fraction_and_frozen_weights_never_move(tmp_path, trainer_kwargs) -> None:
    model = _lenet()
    initial = {n: m.weight.detach().flatten().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    callback = IncrementalQuantizationCallback(bits=4, epochs_per_stage=1)
    probe = Probe()
    trainer = L.Trainer(**trainer_kwargs(max_epochs=5, callbacks=[callback, probe], default_root_dir=tmp_path))
    trainer.fit(model, _loader(), _loader(n=16, seed=1))
    schedule = callback.schedule
    assert schedule == (0.3, 0.55, 0.75, 0.9, 1.0)
    names = list(probe.epochs[0])
    assert names == ["backbone.conv1", "backbone.conv2", "backbone.fc1", "backbone.fc2", "backbone.fc3"]
    for t, fraction in enumerate(schedule):
        for name in names:
            mask = probe.epochs[t][name][0]
            # exactly the scheduled fraction of each layer's weights (to the nearest whole weight)
            assert int(mask.sum()) == frozen_target(fraction, mask.numel())
            assert abs(int(mask.sum()) - fraction * mask.numel()) <= 0.5
            for later in range(t + 1, len(schedule)):
                later_mask, forward, weight, _ = probe.epochs[later][name]
                assert bool(later_mask[mask].all())  # once frozen, always frozen
                # frozen weights do not move: neither the value forward uses nor the float weight behind it
                assert torch.equal(forward[mask], probe.epochs[t][name][1][mask])
                assert torch.equal(weight[mask], probe.epochs[t][name][1][mask])
            if 0 < t < len(schedule) - 1:  # the free weights did retrain during the stage
                free = ~mask
                assert not torch.equal(probe.epochs[t][name][2][free], probe.epochs[t - 1][name][2][free])
    # stage 0 clustered the initial weights: 16 / 2 + 1 = 9 entries from SLQ's initial centroids, 10 Lloyd
    # iterations, 0 fixed -- the same as an independent reference
    for name in names:
        x = initial[name].double().numpy()
        init = power_of_two_entries(initial[name], 9).flatten().double().numpy()
        centres, _ = _lloyd_fixed_zero(x, init, 10)
        np.testing.assert_allclose(probe.epochs[0][name][3].double().numpy(), centres, rtol=1e-5, atol=1e-7)
    # after the last stage every weight is a value of its layer's codebook, one of which is exactly 0
    for layer in quantized_layers(model).values():
        q = layer.weight_quantizer
        book = q.effective_codebook().detach().flatten()
        assert book.numel() == codebook_entries(4) == 9 and book[0].item() == 0.0 and int((book == 0).sum()) == 1
        assert bool((layer.weight.detach().flatten()[:, None] == book[None]).any(dim=1).all())
        assert q.complete and bool(q.frozen_mask.all())
        assert torch.equal(layer.weight, layer.quantized_weight())  # the float weights are the codebook values
    # logs, history, plot, packed size
    assert trainer.callback_metrics["quant/incremental/frozen_fraction"].item() == 1.0
    assert trainer.callback_metrics["quant/incremental/stage"].item() == 5.0
    history = callback.history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4] and [h["fraction"] for h in history] == list(schedule)
    assert all(isinstance(h["accuracy"], float) for h in history)
    assert history[-1]["accuracy"] == pytest.approx(trainer.callback_metrics["val/acc"].item())
    assert callback.plot_path == tmp_path / PLOT_NAME and callback.plot_path.exists()
    report = callback.size_report
    assert report is not None
    assert report.weight_bytes == sum((m.weight.numel() * 4 + 7) // 8 for m in quantized_layers(model).values())
    # packing and dequantization agree with the trained model
    model.eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    save_packed_model(model, tmp_path / "slq.lqpack")
    fresh = load_packed_model(_lenet(seed=9), tmp_path / "slq.lqpack").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        assert torch.equal(dequantize_model(copy.deepcopy(model)).eval()(x), expected)


def test_mlq_quantizes_layer_after_layer_to_ternary_beside_qat(trainer_kwargs) -> None:
    model = _lenet()
    sizes = {n: m.weight.numel() for n, m in model.backbone.named_children() if hasattr(m, "weight")}
    callback = IncrementalQuantizationCallback(
        bits=2, schedule=(0.03, 0.8, 1.0), epochs_per_stage=1, mode="mlq", partition="loss"
    )
    probe = Probe()
    qat = QuantizationAwareTraining(weight_bits=4, act_bits=4, num_calibration_batches=2)
    L.Trainer(**trainer_kwargs(max_epochs=3, callbacks=[qat, callback, probe])).fit(model, _loader())
    total = sum(sizes.values())
    for t, fraction in enumerate(callback.schedule):
        counts = [int(probe.epochs[t]["backbone." + n][0].sum()) for n in sizes]
        assert sum(counts) == frozen_target(fraction, total)  # of the whole network
        # front layers first: full layers, then one partly frozen layer, then untouched ones
        full = [c == sizes[n] for c, n in zip(counts, sizes, strict=True)]
        boundary = full.index(False) if False in full else len(full)
        assert all(full[:boundary]) and all(c == 0 for c in counts[boundary + 1 :])
    assert [int(probe.epochs[0]["backbone." + n][0].sum()) for n in sizes][:2] == [
        150,
        frozen_target(0.03, total) - 150,
    ]
    for name, layer in quantized_layers(model).items():
        q = layer.weight_quantizer
        book = q.effective_codebook().detach().flatten()
        assert book.numel() == 3 and book[0].item() == 0.0  # ternary: 0 and two k-means centroids
        values = layer.weight.detach().flatten()
        assert bool((values[:, None] == book[None]).any(dim=1).all())
        # QAT's activation quantization applies beside the codebooks (first/last layer at its 8 bits)
        assert layer.input_quantizer.bits == (8 if name in ("backbone.conv1", "backbone.fc3") else 4)
        assert q.complete and torch.equal(layer.weight, layer.quantized_weight())


def test_composes_with_qat_in_either_order_and_power_of_two_codebook(trainer_kwargs) -> None:
    specs, models = [], []
    for order in ("qat_first", "slq_first"):
        model = _lenet()
        initial = {n: m.weight.detach().clone() for n, m in model.backbone.named_children() if hasattr(m, "weight")}
        callback = IncrementalQuantizationCallback(bits=3, schedule=(1.0,), codebook="power_of_two", exclude=["*fc3"])
        qat = QuantizationAwareTraining(weight_bits=4, act_bits=8, num_calibration_batches=1)
        callbacks = [qat, callback] if order == "qat_first" else [callback, qat]
        kwargs = trainer_kwargs(max_epochs=1, limit_train_batches=1, callbacks=callbacks)
        L.Trainer(**kwargs).fit(model, _loader())
        specs.append(QuantSpec.from_model(model))
        models.append(model)
        layers = quantized_layers(model)
        assert not isinstance(layers["backbone.fc3"].weight_quantizer, CodebookQuantizer)  # excluded: QAT's grid
        for name in ("conv1", "conv2", "fc1", "fc2"):
            book = layers["backbone." + name].weight_quantizer.effective_codebook().detach().flatten()
            # INQ: 0 and +-2**n1, +-2**(n1-1) with n1 = floor(log2(4/3 max|w|)) of the weight at the stage
            n1 = int(torch.floor(torch.log2(initial[name].abs().max() * 4 / 3)))
            assert book.tolist() == [0.0, 2.0**n1, -(2.0**n1), 2.0 ** (n1 - 1), -(2.0 ** (n1 - 1))]
    assert specs[0] == specs[1]
    assert specs[0].layers["backbone.fc1"].weight_kind == "codebook" and specs[0].layers["backbone.fc1"].frozen


# -- k-means and the partition order -------------------------------------------------------------------------------
def test_kmeans_on_1d_weights_matches_sklearn_from_slq_init() -> None:
    torch.manual_seed(0)
    for weight in (LeNet5().conv2.weight, LeNet5().fc2.weight):
        x = weight.detach().flatten().double()
        init = power_of_two_entries(x, codebook_entries(5)).double()  # 0, +-n_max, +-n_max/2, ...
        ours = kmeans(x[:, None], init, iterations=10)
        ref = KMeans(n_clusters=17, init=init.numpy(), n_init=1, max_iter=10, tol=0.0, algorithm="lloyd")
        ref.fit(x[:, None].numpy())
        assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-5)
        np.testing.assert_allclose(np.sort(ours.centers.flatten().numpy()), np.sort(ref.cluster_centers_.flatten()))
        # with the centroid at 0 fixed (the quantizer's fit) against the independent reference
        q = CodebookQuantizer(x.shape, num_entries=17, fixed_values=(0.0,))
        inertia = q.fit(x.float(), init=init.float(), iterations=10, assign_to_frozen=True)
        centres, ref_inertia = _lloyd_fixed_zero(x.numpy(), init.flatten().numpy(), 10)
        assert inertia == pytest.approx(ref_inertia, rel=1e-5)
        np.testing.assert_allclose(q.codebook.detach().flatten().double().numpy(), centres, rtol=1e-5, atol=1e-7)


def test_partition_orders() -> None:
    w = torch.tensor([0.01, -0.03, 0.9, 1.15, -0.5, -0.45, 0.19, 0.27, 0.0])
    q = CodebookQuantizer(w.shape, num_entries=5, fixed_values=(0.0,))
    q.fit(w, init=torch.tensor([0.0, 1.0, -0.5, 0.25, -0.25]), iterations=0)  # entries stay as given
    assert q.indices.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]
    assert magnitude_ranks(q.effective_codebook()).tolist() == [0, 1, 2, 3, 4]
    # magnitude: the zero cluster (nearest first), then +-1.0, -0.5, 0.25, each nearest first
    assert freeze_order(w, q, "magnitude").tolist() == [8, 0, 1, 2, 3, 4, 5, 7, 6]
    # loss: every weight by (w - c)**2; ties keep index order
    assert freeze_order(w, q, "loss").tolist() == [4, 8, 0, 7, 1, 5, 6, 2, 3]
    q.set_partial(True)
    q.freeze_vectors(torch.tensor([True] * 3 + [False] * 6))
    assert freeze_order(w, q, "loss").tolist() == [4, 8, 7, 5, 6, 3]  # frozen weights leave the order


# -- resume ----------------------------------------------------------------------------------------------------------
def test_kill_mid_stage_and_resume_is_bit_identical_also_into_a_disturbed_fresh_module(
    tmp_path, trainer_kwargs
) -> None:
    def build():
        qat = QuantizationAwareTraining(weight_bits=8, act_bits=4, num_calibration_batches=2)
        callback = IncrementalQuantizationCallback(bits=3, schedule=(0.6, 1.0), epochs_per_stage=2)
        return _lenet(), [callback, qat]

    def disturb(model) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))

    # 4 steps per epoch; stages at epochs 0 and 2; killed in epoch 1, resumed from the end of epoch 0 (mid-stage 0)
    (model_a, [cb_a, _]), (model_c, [cb_c, _]) = crash_and_resume(
        tmp_path, trainer_kwargs, build, _loader(), crash_step=5, max_epochs=4, before_resume=disturb
    )
    assert cb_a.stage == cb_c.stage == 2 and cb_c.history == cb_a.history
    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for key in state_a:
        torch.testing.assert_close(state_c[key], state_a[key], atol=0, rtol=0, msg=key)
    # the stage position and history are in the callback state; clusters and masks are quantizer buffers
    checkpoint = torch.load(tmp_path / "crashed" / "ckpt" / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"][cb_a.state_key]
    assert state["stage"] == 1 and len(state["history"]) == 1 and state["epochs_per_stage"] == 2
    prefix = "backbone.fc1.weight_quantizer."
    for buffer in ("codebook", "indices", "frozen", "frozen_values", "vector_frozen", "partial"):
        assert prefix + buffer in checkpoint["state_dict"]
    assert int(checkpoint["state_dict"][prefix + "vector_frozen"].sum()) == frozen_target(0.6, 48_000)
    # the final checkpoint loads strictly into a freshly built model (codebooks, masks and partial mode included)
    final = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=False)
    loaded = load_quantized(_lenet(seed=5), final).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x), model_c.eval()(x))


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": (0.3, 0.3, 1.0)}, r"`schedule` must be strictly increasing .* got 0.3 after 0.3"),
        ({"schedule": (0.5, 0.3, 1.0)}, r"`schedule` must be strictly increasing"),
        ({"schedule": (0.3, 0.9)}, r"`schedule` must end at 1.0 .* got 0.9 last"),
        (
            {"schedule": (0.0, 0.5, 1.0)},
            r"`schedule\[0\]` must be a finite number > 0 and <= 1, got 0\.0\. HINT: each entry",
        ),
        (
            {"schedule": (0.5, 1.5)},
            r"`schedule\[1\]` must be a finite number > 0 and <= 1, got 1\.5\. HINT: each entry",
        ),
        (
            {"schedule": (-0.2, 1.0)},
            r"`schedule\[0\]` must be a finite number > 0 and <= 1, got -0\.2\. HINT: each entry",
        ),
        ({"schedule": ()}, r"`schedule` must be a non-empty list of fractions"),
        ({"schedule": "0.5,1.0"}, r"`schedule` must be a non-empty list of fractions"),
        ({"schedule": (0.5, "1")}, r"`schedule\[1\]` must be a finite number > 0 and <= 1, got '1'\. HINT: each entry"),
        ({"bits": 1}, r"`bits` must be an integer in \[2, 8\] for mode='slq', got 1.*bits=2 is ternary"),
        ({"bits": 1, "mode": "mlq"}, r"`bits` must be an integer in \[2, 8\] for mode='mlq', got 1"),
        ({"bits": 9}, r"`bits` must be an integer in \[2, 8\]"),
        ({"bits": True}, r"`bits` must be an integer in \[2, 8\]"),
        ({"mode": "inq"}, r"`mode` must be one of \['slq', 'mlq'\], got 'inq'"),
        ({"partition": "random"}, r"`partition` must be one of \['magnitude', 'loss'\]"),
        ({"codebook": "uniform"}, r"`codebook` must be one of \['kmeans', 'power_of_two'\]"),
        ({"epochs_per_stage": 0}, r"`epochs_per_stage` must be an integer >= 1, got 0"),
        ({"warmup_epochs": -1}, r"`warmup_epochs` must be an integer >= 0, got -1"),
        ({"layers": [3]}, r"`layers` must be a list of layer-name patterns"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, match) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        IncrementalQuantizationCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "trainer_args", "match"),
    [
        (
            {},
            {"max_epochs": 3},
            r"The schedule has 5 stages but the Trainer trains 3 epochs .* more stages than epochs",
        ),
        ({"warmup_epochs": 2}, {"max_epochs": 6}, r"trains 6 epochs \(2 of them warm-up\).*max_epochs >= 7"),
        ({"epochs_per_stage": 2}, {"max_epochs": 9}, r"5 stages x `epochs_per_stage`=2 .* = 10 epochs.*trains 9"),
        ({}, {"max_epochs": -1, "max_steps": 10}, r"`epochs_per_stage=None` splits `max_epochs`.*no epoch limit"),
        ({"layers": ["*conv9*"]}, {"max_epochs": 5}, r"`layers` pattern '\*conv9\*' matches no Conv/Linear layer"),
        ({"exclude": ["head"]}, {"max_epochs": 5}, r"`exclude` pattern 'head' matches no Conv/Linear layer"),
    ],
)
def test_bad_setup_fails_before_touching_the_model(kwargs, trainer_args, match, trainer_kwargs) -> None:
    model = _lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = IncrementalQuantizationCallback(**kwargs)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[QuantizationAwareTraining(4, 4), callback], **trainer_args))
    with pytest.raises(QuantizationConfigError, match=match):
        trainer.fit(model, _loader())
    assert not is_quantized(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_layer_smaller_than_the_codebook_is_named(trainer_kwargs) -> None:
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 4), torch.nn.ReLU(), torch.nn.Linear(4, 10))
    model = ImageClassifier(backbone)
    with pytest.raises(QuantizationConfigError, match=r"Layer 'backbone.3' has 40 weights, fewer than the 65 codebook"):
        L.Trainer(**trainer_kwargs(max_epochs=5, callbacks=[IncrementalQuantizationCallback(bits=7)])).fit(
            model, _loader()
        )
    assert not is_quantized(model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_shipped_config_parses(capsys) -> None:
    callbacks = shipped_config("incremental_quantization.yaml", capsys)["trainer"]["callbacks"]
    slq = callbacks[1]["init_args"]
    assert callbacks[1]["class_path"].endswith("IncrementalQuantizationCallback")
    assert slq["bits"] == 4 and slq["schedule"] == [0.3, 0.55, 0.75, 0.9, 1.0] and slq["warmup_epochs"] == 3
    IncrementalQuantizationCallback(**slq)  # the values are valid arguments
