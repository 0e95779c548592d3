"""AutoQBCallback: the search at the start of fit, the budget in every episode, per-channel widths (binary included)
applied, logged, plotted, packed and exported; resume of a killed search; checkpoints; bad input."""

from __future__ import annotations

import csv
import functools

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QuantizationAwareTraining, QuantizationConfigError, QuantSpec, load_quantized
from lightning_quant.allocation.rl import DDPGConfig
from lightning_quant.callbacks.autoqb import PLOT_NAME, AutoQBCallback
from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.export import export_onnx, load_packed_model, save_packed_model, verify_onnx
from lightning_quant.models import ImageClassifier
from lightning_quant.surgery import SPEC_KEY, quantized_layers
from tests.conftest import crash_and_resume

AGENT = DDPGConfig(hidden=16, warmup_episodes=3, batch_size=16, noise_decay=0.9)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


@functools.cache
def _digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    return dm


@functools.cache
def _trained_float() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ImageClassifier(_backbone(), lr=1e-2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        for x, y in _digits().train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model() -> ImageClassifier:
    model = ImageClassifier(_backbone(), lr=1e-3)
    model.load_state_dict(_trained_float())
    return model


#: weights of the quantized layers; first (conv 0) and last (fc) stay at 8 bits
PARAMS = {"conv0": 36, "conv3": 288, "conv6": 576, "fc": 80}


def _size_budget(avg_free_bits: float) -> float:
    """Frozen first and last layer at 8 bits, the others at an average of ``avg_free_bits``."""
    return 8 * (PARAMS["conv0"] + PARAMS["fc"]) + avg_free_bits * (PARAMS["conv3"] + PARAMS["conv6"])


def _callbacks(tmp_path, **kwargs) -> tuple[QuantizationAwareTraining, AutoQBCallback]:
    qat = QuantizationAwareTraining(weight_bits=8, act_bits=4, num_calibration_batches=1)
    options = dict(episodes=5, ddpg=AGENT, calibration_batches=1, eval_batches=2, search_file=str(tmp_path / "s.pt"))
    options.update(kwargs)
    return qat, AutoQBCallback(**options)


def _free_widths(model: nn.Module) -> list[int]:
    layers = quantized_layers(model)
    return [int(b) for n in ("backbone.3", "backbone.6") for b in layers[n].weight_quantizer.channel_widths().tolist()]


# -- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"No budget given\. HINT: pass `size_budget=\.\.\.`"),
        ({"size_budget": -1.0}, r"`size_budget` must be a finite number > 0 or None, got -1\.0\. HINT: a budget"),
        ({"bops_budget": "lots"}, r"`bops_budget` must be a finite number > 0 or None, got 'lots'\. HINT: a budget"),
        ({"size_budget": 1e4, "episodes": 0}, r"`episodes` must be an integer >= 1, got 0\. HINT: the search needs"),
        ({"size_budget": 1e4, "level": "kernel"}, r"`level` must be one of \['channel', 'layer'\], got 'kernel'"),
        ({"size_budget": 1e4, "bit_choices": [0, 4]}, r"`bit_choices` must hold integer bit widths in \[1, 8\]"),
        ({"size_budget": 1e4, "act_bit_choices": [1, 4]}, r"`act_bit_choices` must hold integer bit widths in \[2"),
        ({"size_budget": 1e4, "channels_per_unit": 0}, r"`channels_per_unit` must be an integer >= 1, got 0"),
        ({"size_budget": 1e4, "eval_batches": 0}, r"`eval_batches` must be an integer >= 1, got 0"),
        ({"size_budget": 1e4, "metric": "f1"}, r"`metric` must be one of \['accuracy', 'cross_entropy'\]"),
        (
            {"size_budget": 1e4, "reward_scale": 0},
            r"`reward_scale` must be a finite number > 0, got 0\. HINT: HAQ's is `reward_scale=10`",
        ),
        ({"size_budget": 1e4, "ddpg": {"hidden": 3}}, r"`ddpg` must be a DDPGConfig, got dict"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, match) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        AutoQBCallback(**kwargs)


def test_a_budget_no_allocation_meets_fails_before_anything_changes(tmp_path, trainer_kwargs) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    qat, autoqb = _callbacks(tmp_path, size_budget=_size_budget(0.5))  # binary everywhere is 1 bit on average
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat, autoqb, Count()]))
    with pytest.raises(QuantizationConfigError, match=r"`size_budget` = 1360 cannot be met.*smallest achievable"):
        trainer.fit(model, _digits())
    assert not steps and not (tmp_path / "s.pt").exists()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # float weights and BatchNorm untouched
    assert set(_free_widths(model)) == {8}


def test_a_model_without_quantizable_layers_is_an_error(trainer_kwargs) -> None:
    class NoLayers(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (batch[0] * self.scale).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[AutoQBCallback(size_budget=1e3, episodes=1)]))
    with pytest.raises(QuantizationConfigError, match=r"has no layer that can be quantized.*AutoQBCallback"):
        trainer.fit(NoLayers(), data)


# -- the search end to end --------------------------------------------------------------------------------------
def test_search_then_qat_budget_in_every_episode_widths_logged_plotted(tmp_path, trainer_kwargs) -> None:
    model = _model()
    qat, autoqb = _callbacks(tmp_path, size_budget=_size_budget(2.0))
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(**trainer_kwargs(max_steps=3, logger=logger, callbacks=[qat, autoqb], log_every_n_steps=1))
    trainer.fit(model, _digits())
    history = autoqb.history
    assert [h["episode"] for h in history] == [0, 1, 2, 3, 4]
    budget = _size_budget(2.0)
    for h in history:  # the budget holds in every episode, not only for the result
        assert h["costs"]["size_bits"] <= budget and h["budget_used"] <= 1.0
    best = autoqb.best
    assert best["reward"] == max(h["reward"] for h in history)
    assert 0.0 <= best["metric"] <= 1.0 and 0.5 < autoqb.reference <= 1.0
    # the best policy is what the model got (units are single channels here, in channel order)
    assert _free_widths(model) == best["bits"]
    widths = autoqb.widths(model)
    assert widths["backbone.0"] == [8] * 4 and widths["backbone.11"] == [8] * 10
    summary_bits = sum(m.weight_quantizer.payload_bits(m.weight) for m in quantized_layers(model).values())
    assert summary_bits == best["costs"]["size_bits"] <= budget
    assert trainer.global_step == 3  # QAT trained on the policy
    # logged per episode through the trainer's loggers, plotted into the log directory
    with open(logger.log_dir + "/metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rewards = [float(r["quant/autoqb/reward"]) for r in rows if r.get("quant/autoqb/reward")]
    assert rewards == pytest.approx([h["reward"] for h in history])
    assert any(r.get("quant/autoqb/accuracy") for r in rows) and any(r.get("quant/autoqb/size_bits") for r in rows)
    assert autoqb.plot_path is not None and autoqb.plot_path.name == PLOT_NAME
    assert autoqb.plot_path.stat().st_size > 2000
    # the recipe (per-channel widths) is in the checkpoint and rebuilds the model
    assert autoqb.spec == QuantSpec.from_model(model)
    path = tmp_path / "q.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"][autoqb.state_key]
    assert state["done"] and state["best"] == best
    assert set(state["search"]["agent"]["agents"]) == {"high", "low"}  # the agents, their buffers and optimizers
    assert state["search"]["agent"]["agents"]["low"]["buffer"]["size"] == 5 * 16
    fresh = load_quantized(ImageClassifier(_backbone()), path)
    assert _free_widths(fresh) == best["bits"]
    assert QuantSpec.from_dict(checkpoint[SPEC_KEY]) == autoqb.spec


def test_layer_level_gives_one_width_per_layer(tmp_path, trainer_kwargs) -> None:
    model = _model()
    qat, autoqb = _callbacks(tmp_path, size_budget=_size_budget(3.0), level="layer", save_search=False)
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[qat, autoqb])).fit(model, _digits())
    layers = quantized_layers(model)
    assert all(isinstance(layers[n].weight_quantizer.bits, int) for n in ("backbone.3", "backbone.6"))
    assert [len(h["bits"]) for h in autoqb.history] == [2] * 5  # two units: the two free layers
    assert autoqb.search_path is None and not (tmp_path / "s.pt").exists()


def test_bops_budget_with_searched_activation_widths(tmp_path, trainer_kwargs) -> None:
    model = _model()
    qat, autoqb = _callbacks(tmp_path, bops_budget=6e5, act_bit_choices=[2, 4, 8], channels_per_unit=4)
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[qat, autoqb])).fit(model, _digits())
    for h in autoqb.history:
        assert h["costs"]["bops"] <= 6e5
        assert len(h["act_bits"]) == 2 and set(h["act_bits"]) <= {2, 4, 8}
    assert [len(h["bits"]) for h in autoqb.history] == [4] * 5  # 8 + 8 channels in units of 4
    layers = quantized_layers(model)
    assert [layers[n].input_quantizer.bits for n in ("backbone.3", "backbone.6")] == autoqb.best["act_bits"]


# -- resume ----------------------------------------------------------------------------------------------------
class _CrashAtEpisode(AutoQBCallback):
    def __init__(self, crash_at: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def on_episode(self, trainer, pl_module, record) -> None:
        if record["episode"] == self.crash_at:
            raise RuntimeError("simulated crash")


def test_a_killed_search_resumes_bit_identically(tmp_path, trainer_kwargs) -> None:
    def run(folder: str, crash_at: int | None):
        torch.manual_seed(0)
        model = _model()  # a fresh module and fresh callbacks in every run: only the search file carries over
        qat = QuantizationAwareTraining(weight_bits=8, act_bits=4, num_calibration_batches=1)
        autoqb = _CrashAtEpisode(
            crash_at,
            size_budget=_size_budget(2.0),
            episodes=6,
            ddpg=AGENT,
            calibration_batches=1,
            eval_batches=2,
            search_file=str(tmp_path / folder / "search.pt"),
        )
        trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat, autoqb]))
        trainer.fit(model, _digits())
        return model, autoqb

    straight_model, straight = run("straight", None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("crashed", 3)
    resumed_model, resumed = run("crashed", None)
    assert _same_history(resumed.history, straight.history)
    assert _same_history([resumed.best], [straight.best])
    a, b = straight.state()["search"]["agent"], resumed.state()["search"]["agent"]
    for name in ("high", "low"):
        for key in ("actor", "critic", "actor_optimizer"):
            flat_a, flat_b = _flat(a["agents"][name][key]), _flat(b["agents"][name][key])
            assert flat_a.keys() == flat_b.keys()
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), (name, key)
    straight_state, resumed_state = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)  # QAT after it too


def _same_history(a: list[dict], b: list[dict]) -> bool:
    """Equal episode records, wall time aside."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in a] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in b
    ]


def _flat(state, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flat(v, f"{prefix}{i}."))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state
    else:
        out[prefix] = torch.tensor(float(state)) if isinstance(state, (int, float)) else torch.tensor(0.0)
    return out


def test_qat_resumed_from_a_checkpoint_does_not_search_again(tmp_path, trainer_kwargs) -> None:
    log = tmp_path / "episodes.txt"  # a file: the crashed run is a child process (killed by SIGKILL)

    class Counting(AutoQBCallback):
        def on_episode(self, trainer, pl_module, record) -> None:
            with log.open("a") as f:
                f.write(f"{record['episode']}\n")

    def build():
        torch.manual_seed(0)
        qat = QuantizationAwareTraining(weight_bits=8, act_bits=4, num_calibration_batches=1)
        autoqb = Counting(
            size_budget=_size_budget(2.0),
            episodes=4,
            ddpg=AGENT,
            calibration_batches=1,
            eval_batches=2,
            save_search=False,
        )
        return _model(), [qat, autoqb]

    # in a fixed order: a shuffled loader's generator restarts in a resumed run, whatever the callbacks
    data = DataLoader(_digits().train_dataset, batch_size=64)
    (straight_model, straight_cbs), (resumed_model, resumed_cbs) = crash_and_resume(
        tmp_path,
        trainer_kwargs,
        build,
        data,
        crash_step=25,
        max_epochs=2,
        before_resume=lambda m: m.backbone[3].weight.data.add_(1.0),
    )
    searches = [int(line) for line in log.read_text().split()]
    assert searches == [0, 1, 2, 3] * 2  # the straight and the crashed run searched; the resumed one did not
    assert _same_history([resumed_cbs[1].best], [straight_cbs[1].best])
    assert _same_history(resumed_cbs[1].history, straight_cbs[1].history)
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- packing and export of the result ---------------------------------------------------------------------------
def test_searched_per_channel_widths_with_binary_channels_pack_and_export(tmp_path, trainer_kwargs) -> None:
    model = _model()
    # 1.4 bits on average over the free layers: the budget forces binary channels beside wider ones
    qat, autoqb = _callbacks(tmp_path, size_budget=_size_budget(1.4), save_search=False)
    L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat, autoqb])).fit(model, _digits())
    widths = _free_widths(model)
    assert 1 in widths and max(widths) >= 2, widths
    model.eval()
    loader = _digits().val_dataloader()
    # packing: codes at their widths, one width per channel; a fresh float model reloads the same outputs
    path = tmp_path / "model.lqpk"
    save_packed_model(model, path)
    fresh = load_packed_model(ImageClassifier(_backbone()), path)
    fresh.eval()
    x, _ = next(iter(loader))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # ONNX (4-bit activations: the exact path) and onnxruntime
    onnx_path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    result = verify_onnx(model, onnx_path, loader)
    assert result.agreement >= 0.999, result
    assert np.isclose(result.torch_accuracy, result.onnx_accuracy, atol=1e-3)
