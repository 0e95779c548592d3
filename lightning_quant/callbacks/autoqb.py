"""AutoQB: a hierarchical DDPG agent picks the weight width of every output channel (binary included) under a budget,
before quantization-aware training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_quant.allocation.cost import check_budget, layer_costs, trace_macs
from lightning_quant.allocation.episodes import METRICS, Metric, ModelEnvironment, split_batch
from lightning_quant.allocation.rl import DDPGConfig, HierarchicalAgent, LayerAgent, PolicySearch
from lightning_quant.allocation.solvers import validate_bit_choices
from lightning_quant.allocation.units import (
    AllocationProblem,
    UnitLayout,
    channel_layout,
    check_channel_widths_supported,
    layer_descriptors,
    layer_layout,
    unit_descriptors,
)
from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.io import load_weights_only
from lightning_quant.core.observers import rank_local_statistics
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.core.validation import check_choice, check_int, check_real
from lightning_quant.surgery.layers import quantized_layers
from lightning_quant.surgery.quantize import is_quantized
from lightning_quant.surgery.requests import QuantizationRequest, explicit_fields
from lightning_quant.surgery.spec import QuantSpec

log = logging.getLogger(__name__)

Level = Literal["channel", "layer"]
#: file name of the width heat map in the logger's directory
PLOT_NAME = "autoqb_widths.png"
#: the version of the search file's layout
_FILE_VERSION = 1


class AutoQBCallback(QuantizationCallback):
    """AutoQB: reinforcement learning picks a weight width per output channel (or per layer) under a size or BOPs
    budget at the start of ``fit``; quantization-aware training then proceeds on the best policy found.

    Paper: Y. Lou, Q. Liu, H. Kim, L. Jiang, "AutoQB: AutoML for Network Quantization and Binarization on Mobile
    Devices", arXiv:1902.05690, 2019 (later "AutoQ: Automated Kernel-Wise Neural Network Quantization", ICLR 2020).
    From the paper: a hierarchical DDPG agent (a high-level agent picks per layer a goal -- the average weight width
    -- and the activation width; a goal-conditioned low-level agent picks the width of each output channel, binary
    included) rewarded by accuracy and hardware cost, the low level also for meeting its goal; the claim is the same
    accuracy at much lower cost, or more accuracy at the same cost, than layer-level DDPG (HAQ, Wang et al., CVPR
    2019). No author code is public; the agent follows HAQ's public DDPG (hyper-parameters in
    :class:`~lightning_quant.allocation.rl.DDPGConfig`), and what is ours is listed in
    :mod:`lightning_quant.allocation.rl` and :mod:`lightning_quant.allocation.units`.

    What happens in ``on_fit_start`` (rank 0; the result is broadcast):

    1. Fixed batches are drawn under ``seed``: ``calibration_batches`` (and ``finetune_batches``) training batches,
       and ``eval_batches`` validation batches (training batches after those when there is no validation loader);
       the random generators of the loaders are restored afterwards, so training sees the data it would without the
       search.
    2. The units: every output channel of every allocatable layer (``level="channel"``; groups of
       ``channels_per_unit`` channels of similar weight norm), or every layer (``level="layer"``, HAQ's agent).
       Layers frozen by the recipe (``first_last_bits``) keep their widths and count in the budget.
    3. ``episodes`` episodes: the agent proposes widths; the proposal is projected onto the budget by the suite's
       budget-keeping solver (**every episode's allocation meets the budget**); the model (from the same snapshot each
       time) gets the widths, its weight ranges, BatchNorm statistics and activation ranges are recalibrated, it is
       optionally fine-tuned for ``finetune_steps`` steps, and evaluated; reward = ``reward_scale x (accuracy -
       float accuracy) - cost_weight x budget used`` (:mod:`lightning_quant.allocation.episodes`).
    4. The best policy (highest reward) is applied and recalibrated; the trainer's optimizer then trains on it (add
       ``QuantizationAwareTraining`` for its calibration schedule; alone, the callback quantizes with ``base_spec``).

    The search state (networks, optimizers, replay buffers, the random generator, the best policy and the history)
    is written to ``search_file`` after every episode; a run killed during the search and started again with the same
    settings resumes from the last episode and ends bit-identically (a file from a finished search is reused, so a
    second ``fit`` with the same settings does not search again; a file from other settings is replaced, with a
    warning). The same state is in Lightning checkpoints (``state_dict``), so QAT resumed from a checkpoint does not
    search again. A progress bar runs over the episodes; the trainer's loggers get ``quant/autoqb/reward``,
    ``accuracy`` (or ``cross_entropy``), ``budget_used``, each budget's cost (``size_bits``, ``bops``),
    ``best_reward`` and the critic loss per episode (step = episode). A heat map of the per-channel widths of every
    layer and the reward curve are saved to ``<log_dir>/autoqb_widths.png``.

    Args:
        size_budget: the most bits the quantized weights may take (frozen layers included; step sizes not counted).
        bops_budget: the most bit operations per sample, ``sum MACs x weight bits x input bits`` (float inputs
            count 32 bits); MACs are traced on a calibration batch.
        episodes: search episodes (>= 1).
        level: ``"channel"`` (AutoQB's hierarchical agent) or ``"layer"`` (HAQ's agent, one width per layer).
        bit_choices: the weight widths to choose from (1 = binary); default 1-8 at channel level, 2-8 at layer level.
        act_bit_choices: input widths to choose from per layer (the high-level agent's second action), or ``None`` to
            keep the recipe's input widths.
        channels_per_unit: output channels that share one width (``level="channel"``): big layers stay tractable.
        calibration_batches: training batches for recalibration in every episode.
        eval_batches: validation batches the accuracy is measured on.
        finetune_steps: SGD steps on training batches in every episode before the evaluation (0: none).
        finetune_batches: distinct training batches those steps cycle through.
        finetune_lr: their learning rate.
        recalibrate_bn: re-estimate BatchNorm statistics in every episode.
        metric: ``"accuracy"`` or ``"cross_entropy"`` (reward on minus the loss), from the model's logits and labels.
        reward_scale: reward per unit of metric above the float model's (10: HAQ's 0.1 per accuracy point).
        cost_weight: weight of the budget used in the reward (0: accuracy only; the budget holds regardless).
        intrinsic_weight: weight of the low level's goal-reaching reward.
        ddpg: the agent's hyper-parameters (default: HAQ's, with its exploration decay compressed to ``episodes``:
            :meth:`~lightning_quant.allocation.rl.DDPGConfig.for_episodes`).
        seed: seeds the agent, the exploration and the batches drawn.
        search_file: where the search state is written after every episode (default:
            ``<default_root_dir>/autoqb_<level>_search.pt``); ``None`` with ``save_search=False`` writes nothing.
        save_search: write (and resume from) ``search_file``.
        progress_bar: show a progress bar over the episodes (when the trainer shows one).
        plot: save the heat map.
        base_spec: recipe used to quantize a model that is not quantized yet (alone; beside QAT, QAT's recipe wins).

    Example:
        >>> autoqb = AutoQBCallback(size_budget=3 * 270_000, episodes=200, level="channel")  # doctest: +SKIP
        >>> qat = QuantizationAwareTraining(act_bits=8)  # doctest: +SKIP
        >>> trainer = L.Trainer(max_epochs=5, callbacks=[qat, autoqb])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> autoqb.best["metric"], autoqb.spec  # doctest: +SKIP
    """

    TECHNIQUE = "autoqb"
    LEVELS: ClassVar[tuple[str, ...]] = ("channel", "layer")
    METRICS: ClassVar[tuple[str, ...]] = METRICS
    CHANNEL_BIT_CHOICES: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 5, 6, 7, 8)
    LAYER_BIT_CHOICES: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)

    def __init__(
        self,
        size_budget: float | None = None,
        bops_budget: float | None = None,
        *,
        episodes: int = 100,
        level: Level = "channel",
        bit_choices: Sequence[int] | None = None,
        act_bit_choices: Sequence[int] | None = None,
        channels_per_unit: int = 1,
        calibration_batches: int = 2,
        eval_batches: int = 4,
        finetune_steps: int = 0,
        finetune_batches: int = 4,
        finetune_lr: float = 1e-3,
        recalibrate_bn: bool = True,
        metric: Metric = "accuracy",
        reward_scale: float = 10.0,
        cost_weight: float = 0.0,
        intrinsic_weight: float = 0.5,
        ddpg: DDPGConfig | None = None,
        seed: int = 0,
        search_file: str | None = None,
        save_search: bool = True,
        progress_bar: bool = True,
        plot: bool = True,
        base_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        for argument, value in (("size_budget", size_budget), ("bops_budget", bops_budget)):
            check_budget(argument, value)
        if size_budget is None and bops_budget is None:
            raise QuantizationConfigError(
                "No budget given. HINT: pass `size_budget=...` (bits of the quantized weights) or `bops_budget=...` "
                "(bit operations per sample)."
            )
        check_choice("level", level, self.LEVELS)
        check_int("episodes", episodes, minimum=1, fix="the search needs at least one episode, e.g. `episodes=100`.")
        check_int("channels_per_unit", channels_per_unit, minimum=1, fix="1 gives every output channel its own width.")
        if level == "layer" and channels_per_unit != 1:
            raise QuantizationConfigError(
                f"`channels_per_unit` = {channels_per_unit} has no effect with `level` = 'layer' (one width per "
                "layer). HINT: pass `level='channel'` to group channels, or leave `channels_per_unit` at 1."
            )
        check_int("calibration_batches", calibration_batches, minimum=0, fix="pass e.g. `calibration_batches=2`.")
        check_int("eval_batches", eval_batches, minimum=1, fix="the reward needs an accuracy, e.g. `eval_batches=4`.")
        check_int("finetune_steps", finetune_steps, minimum=0, fix="0 evaluates without fine-tuning.")
        check_int("finetune_batches", finetune_batches, minimum=1, fix="pass e.g. `finetune_batches=4`.")
        check_int("seed", seed, minimum=0, fix="pass e.g. `seed=0`.")
        check_real("finetune_lr", finetune_lr, minimum=0, minimum_inclusive=False, fix="pass e.g. `finetune_lr=1e-3`.")
        check_real("reward_scale", reward_scale, minimum=0, minimum_inclusive=False, fix="HAQ's is `reward_scale=10`.")
        check_real("cost_weight", cost_weight, minimum=0, fix="0 rewards accuracy only; the budget holds regardless.")
        check_real("intrinsic_weight", intrinsic_weight, minimum=0, fix="pass e.g. `intrinsic_weight=0.5`.")
        check_choice("metric", metric, METRICS)
        default = self.CHANNEL_BIT_CHOICES if level == "channel" else self.LAYER_BIT_CHOICES
        self.bit_choices = validate_bit_choices(default if bit_choices is None else bit_choices, allow_binary=True)
        self.act_bit_choices = (
            None if act_bit_choices is None else validate_bit_choices(act_bit_choices, "act_bit_choices")
        )
        if ddpg is not None and not isinstance(ddpg, DDPGConfig):
            raise QuantizationConfigError(f"`ddpg` must be a DDPGConfig, got {type(ddpg).__name__}.")
        if base_spec is not None and not isinstance(base_spec, QuantSpec):
            raise QuantizationConfigError(f"`base_spec` must be a QuantSpec, got {type(base_spec).__name__}.")
        self.size_budget = None if size_budget is None else float(size_budget)
        self.bops_budget = None if bops_budget is None else float(bops_budget)
        self.episodes = episodes
        self.level: Level = level
        self.channels_per_unit = channels_per_unit
        self.calibration_batches = calibration_batches
        self.eval_batches = eval_batches
        self.finetune_steps = finetune_steps
        self.finetune_batches = finetune_batches
        self.finetune_lr = float(finetune_lr)
        self.recalibrate_bn = bool(recalibrate_bn)
        self.metric: Metric = metric
        self.reward_scale = float(reward_scale)
        self.cost_weight = float(cost_weight)
        self.intrinsic_weight = float(intrinsic_weight)
        self.ddpg = ddpg if ddpg is not None else DDPGConfig.for_episodes(episodes)
        self.seed = seed
        self.search_file = search_file
        self.save_search = bool(save_search)
        self.progress_bar = bool(progress_bar)
        self.plot = bool(plot)
        self.base_spec = base_spec if base_spec is not None else QuantSpec()
        self._base_spec_given = base_spec is not None
        # results and state
        self._search_state: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._checkpoint_fingerprint: str | None = None  # what a restored state was searched with
        self._done = False
        self._best: dict[str, Any] | None = None
        self._layout: dict[str, Any] | None = None
        self._spec: QuantSpec | None = None
        self._plot_path: Path | None = None
        self._search_path: Path | None = None

    # -- identity, state, results ----------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {"size_budget": self.size_budget, "bops_budget": self.bops_budget, "level": self.level}

    @override
    def state(self) -> dict[str, Any]:
        return {
            "done": self._done,
            "fingerprint": self._fingerprint,
            "search": self._search_state,
            "best": None if self._best is None else dict(self._best),
            "layout": self._layout,
        }

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._done = bool(state["done"])
        self._fingerprint = self._checkpoint_fingerprint = state["fingerprint"]
        self._search_state = state["search"]
        self._best = None if state["best"] is None else dict(state["best"])
        self._layout = state["layout"]

    @property
    def done(self) -> bool:
        """Whether the search has finished and its best policy was applied."""
        return self._done

    @property
    def best(self) -> dict[str, Any]:
        """The best episode: ``episode``, ``reward``, ``metric``, ``costs``/``budgets``, ``bits`` (per unit),
        ``act_bits``, ... (see :class:`~lightning_quant.allocation.rl.PolicySearch`)."""
        if self._best is None:
            raise QuantizationConfigError("No search yet: call `trainer.fit(...)` with this callback first.")
        return dict(self._best)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per episode (the search's history)."""
        return [] if self._search_state is None else [dict(h) for h in self._search_state["history"]]

    @property
    def reference(self) -> float:
        """The float model's metric on the search's evaluation batches (the rewards' reference)."""
        if self._search_state is None:
            raise QuantizationConfigError("No search yet: call `trainer.fit(...)` with this callback first.")
        return float(self._search_state["reference"])

    @property
    def spec(self) -> QuantSpec:
        """The model's exact recipe after the best policy was applied (per-channel widths included)."""
        if self._spec is None:
            raise QuantizationConfigError("No search yet: call `trainer.fit(...)` with this callback first.")
        return self._spec

    @property
    def plot_path(self) -> Path | None:
        """Where the heat map was written (``None`` before the search or with ``plot=False``)."""
        return self._plot_path

    @property
    def search_path(self) -> Path | None:
        """The search file used by the last search (``None`` with ``save_search=False``)."""
        return self._search_path

    def widths(self, pl_module: nn.Module) -> dict[str, list[int]]:
        """The weight width of every output channel of each quantized layer of ``pl_module`` now."""
        out = {}
        for name, layer in quantized_layers(pl_module).items():
            quantizer = layer.weight_quantizer
            if isinstance(quantizer, UniformQuantizer):
                out[name] = quantizer.channel_widths().expand(layer.weight.shape[0]).tolist()
        return out

    # -- surgery ---------------------------------------------------------------------------------------------
    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        # a fallback recipe (QAT's wins), but channel widths need per-channel step sizes
        required = set(explicit_fields(self.base_spec)) if self._base_spec_given else set()
        if self.level == "channel":
            required.add("default.weight_granularity")
        return QuantizationRequest(type(self).__name__, self.base_spec, frozenset(required), priority=50)

    # -- the search ------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quantized(pl_module):
            raise QuantizationConfigError(
                "AutoQBCallback found no quantized layer (its `base_spec` selects none). HINT: check `base_spec`'s "
                "include/exclude, or add `QuantizationAwareTraining` to the callbacks."
            )
        if self._done:
            return  # resumed after the search: the model and its widths came back from the checkpoint
        if trainer.world_size == 1:
            self._run_search(trainer, pl_module)
            return
        # DDP: rank 0 searches; the other ranks take its state and its model (the policy applied and recalibrated)
        _train_loader(trainer), _val_loader(trainer)  # every rank: Lightning's loader set-up holds a barrier
        payload: dict[str, Any] | None = None
        error: Exception | None = None
        if trainer.is_global_zero:
            try:
                with rank_local_statistics():  # the other ranks wait in the broadcast: no collective may run here
                    self._run_search(trainer, pl_module)
            except Exception as err:  # re-raised below, after the other ranks were told
                error = err
            payload = {"failed": error is not None, "state": self.state()}
            if error is None:
                payload["model"] = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        payload = trainer.strategy.broadcast(payload, src=0)
        assert payload is not None
        if error is not None:
            raise error
        if payload["failed"]:
            raise RuntimeError("AutoQBCallback: the search failed on rank 0 (see its error).")
        if not trainer.is_global_zero:
            self.load_state(payload["state"])
            pl_module.load_state_dict(payload["model"])
            self._spec = QuantSpec.from_model(pl_module)

    def _run_search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        calibration, evaluation, finetune = self._batches(trainer)
        macs = None
        if self.bops_budget is not None:
            macs = trace_macs(pl_module, calibration[0][:1] if calibration else _inputs(evaluation[0])[:1])
        costs = layer_costs(pl_module, macs)
        names = [n for n, frozen in zip(costs.names, costs.frozen, strict=True) if not frozen]
        found = quantized_layers(pl_module)
        if self.level == "channel":
            check_channel_widths_supported(pl_module, names, allow_binary=1 in self.bit_choices)
            layout = channel_layout(pl_module, names, self.channels_per_unit)
        else:
            if 1 in self.bit_choices:
                check_channel_widths_supported(pl_module, [], allow_binary=True)
            layout = layer_layout(names, [found[n].weight.shape[0] for n in names])
        if self.act_bit_choices is not None:
            self._check_unshared_inputs(pl_module, names)
        problem = AllocationProblem(
            layout,
            costs,
            self.bit_choices,
            size_budget=self.size_budget,
            bops_budget=self.bops_budget,
            act_bit_choices=self.act_bit_choices,
            layer_features=layer_descriptors(pl_module, names, macs),
            unit_features=unit_descriptors(pl_module, layout),
        )
        problem.check()  # an impossible budget fails here, before the model is touched
        self._layout = {"layers": list(layout.layers), "unit_channels": [list(c) for c in layout.unit_channels]}
        self._fingerprint = self._make_fingerprint(layout, len(calibration), len(evaluation), len(finetune))
        env = ModelEnvironment(
            pl_module,
            layout,
            calibration,
            evaluation,
            finetune,
            finetune_steps=self.finetune_steps,
            finetune_lr=self.finetune_lr,
            recalibrate_bn=self.recalibrate_bn,
            metric=self.metric,
        )
        if self.level == "channel":
            agent: LayerAgent | HierarchicalAgent = HierarchicalAgent(
                problem, self.ddpg, self.seed, intrinsic_weight=self.intrinsic_weight
            )
        else:
            agent = LayerAgent(problem, self.ddpg, self.seed)
        search = PolicySearch(
            problem, agent, env.evaluate, reward_scale=self.reward_scale, cost_weight=self.cost_weight
        )
        path = self._resolve_search_file(trainer)
        restored = self._restore(search, path)
        if not restored:
            search.reference = env.reference()
        try:
            self._loop(trainer, pl_module, search, path)
        finally:
            if not self._done:
                env.restore()  # a failed search leaves the model at its snapshot
        assert search.best is not None
        self._best = dict(search.best)
        env.apply(
            np.array(search.best["bits"]),
            None if search.best["act_bits"] is None else np.array(search.best["act_bits"]),
        )
        self._spec = QuantSpec.from_model(pl_module)
        self._log_best(trainer, search)
        if self.plot:
            folder = trainer.log_dir or trainer.default_root_dir
            if folder is not None:
                self._plot_path = save_width_heatmap(
                    self.widths(pl_module), Path(folder) / PLOT_NAME, layers=list(layout.layers), history=search.history
                )

    def _loop(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, search: PolicySearch, path: Path | None
    ) -> None:
        from tqdm import tqdm

        show = self.progress_bar and trainer.progress_bar_callback is not None
        with tqdm(
            total=self.episodes, initial=min(search.episode, self.episodes), desc="AutoQB search", disable=not show
        ) as bar:

            def on_episode(record: dict[str, Any]) -> None:
                self._search_state = search.state_dict()
                if path is not None:
                    _save_atomic(
                        {"version": _FILE_VERSION, "fingerprint": self._fingerprint, "search": self._search_state}, path
                    )
                self._log_episode(trainer, record, search)
                bar.update(1)
                assert search.best is not None
                bar.set_postfix(
                    reward=f"{record['reward']:.3f}",
                    metric=f"{record['metric']:.4f}",
                    best=f"{search.best['reward']:.3f}",
                )
                self.on_episode(trainer, pl_module, record)

            search.run(self.episodes, on_episode)
        self._search_state = search.state_dict()
        self._done = True

    def on_episode(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, Any]) -> None:
        """Called after every episode (its state already saved); a hook for subclasses."""

    # -- resuming --------------------------------------------------------------------------------------------
    def _make_fingerprint(self, layout: UnitLayout, calibration: int, evaluation: int, finetune: int) -> str:
        settings = {
            "level": self.level,
            "bit_choices": list(self.bit_choices),
            "act_bit_choices": None if self.act_bit_choices is None else list(self.act_bit_choices),
            "budgets": [self.size_budget, self.bops_budget],
            "units": [list(c) for c in layout.unit_channels],
            "layers": list(layout.layers),
            "batches": [calibration, evaluation, finetune],
            "finetune": [self.finetune_steps, self.finetune_lr],
            "recalibrate_bn": self.recalibrate_bn,
            "metric": self.metric,
            "reward": [self.reward_scale, self.cost_weight, self.intrinsic_weight],
            "ddpg": dataclasses.asdict(self.ddpg),
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def _resolve_search_file(self, trainer: pl.Trainer) -> Path | None:
        if not self.save_search:
            self._search_path = None
            return None
        if self.search_file is not None:
            path = Path(self.search_file)
        else:
            path = Path(trainer.default_root_dir) / f"autoqb_{self.level}_search.pt"
        self._search_path = path
        return path

    def _restore(self, search: PolicySearch, path: Path | None) -> bool:
        """Load the search from the callback's state (a Lightning checkpoint) or the search file, if they match."""
        candidates: list[tuple[str, dict[str, Any] | None, str | None]] = [
            ("checkpoint", self._search_state, self._checkpoint_fingerprint)
        ]
        if path is not None and path.is_file():
            saved = load_weights_only(path, "search_file")  # tensors and plain containers only
            candidates.append((os.fspath(path), saved.get("search"), saved.get("fingerprint")))
        best = None
        for source, state, fingerprint in candidates:
            if state is None:
                continue
            if fingerprint != self._fingerprint:
                if source != "checkpoint":
                    rank_zero_warn(
                        f"AutoQBCallback: the search file {source!r} was written with other settings (or another "
                        "model); starting a new search and replacing it. HINT: pass another `search_file` to keep it."
                    )
                continue
            if best is None or int(state["episode"]) > int(best[1]["episode"]):
                best = (source, state)
        if best is None:
            return False
        search.load_state_dict(best[1])
        log.info("AutoQBCallback: resumed the search at episode %d from %s.", search.episode, best[0])
        return True

    # -- data ------------------------------------------------------------------------------------------------
    def _batches(self, trainer: pl.Trainer) -> tuple[list[Any], list[Any], list[Any]]:
        train = _first_loader(_train_loader(trainer))
        val = _first_loader(_val_loader(trainer))
        need_train = self.calibration_batches + (self.finetune_batches if self.finetune_steps else 0)
        need_eval = self.eval_batches
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # shuffled loaders yield the same batches in every (resumed) run
            train_batches = _take(train, need_train + (0 if val is not None else need_eval))
            eval_batches = _take(val, need_eval) if val is not None else train_batches[need_train:]
        if val is None:
            rank_zero_warn(
                "AutoQBCallback: no validation dataloader, so the search measures accuracy on training batches "
                "(not used for calibration). HINT: pass `val_dataloaders` or a datamodule with `val_dataloader`."
            )
        if not eval_batches:
            raise QuantizationConfigError(
                "AutoQBCallback needs labelled batches to measure accuracy on, and found none. HINT: pass a "
                "validation dataloader (or training batches) to `trainer.fit`."
            )
        calibration = [_inputs(b) for b in train_batches[: self.calibration_batches]]
        finetune = train_batches[self.calibration_batches : need_train] if self.finetune_steps else []
        for b in eval_batches[:1]:
            split_batch(b, "validation batch")
        return calibration, eval_batches, finetune

    def _check_unshared_inputs(self, pl_module: nn.Module, names: list[str]) -> None:
        owners: dict[int, str] = {}
        found = quantized_layers(pl_module)
        for name in names:
            quantizer = found[name].input_quantizer
            if isinstance(quantizer, UniformQuantizer) and owners.setdefault(id(quantizer), name) != name:
                raise QuantizationConfigError(
                    f"`act_bit_choices` gives every layer its own input width, but {owners[id(quantizer)]!r} and "
                    f"{name!r} share one input quantizer (`quantize_residuals=True`). HINT: pass "
                    "`act_bit_choices=None`, or quantize without `quantize_residuals`."
                )

    # -- logging and plots -----------------------------------------------------------------------------------
    def _log_episode(self, trainer: pl.Trainer, record: dict[str, Any], search: PolicySearch) -> None:
        if not trainer.loggers:
            return
        metrics = {
            "reward": record["reward"],
            self.metric: record["metric"],
            "budget_used": record["budget_used"],
            "best_reward": search.best["reward"] if search.best else record["reward"],
            **{name: value for name, value in record["costs"].items()},
        }
        if record.get("critic_loss") is not None:
            metrics["critic_loss"] = record["critic_loss"]
        keyed = {f"quant/{self.TECHNIQUE}/{k}": float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(keyed, step=int(record["episode"]))

    def _log_best(self, trainer: pl.Trainer, search: PolicySearch) -> None:
        best = search.best
        assert best is not None
        costs = ", ".join(f"{k} {v:.6g} / {best['budgets'][k]:.6g}" for k, v in best["costs"].items())
        log.info(
            "AutoQB (%s level): best of %d episodes at episode %d: %s %.4f (float %.4f), reward %.4f, %s.",
            self.level,
            search.episode,
            best["episode"],
            self.metric,
            best["metric"],
            search.reference,
            best["reward"],
            costs,
        )
        for logger in trainer.loggers:
            logger.save()


def save_width_heatmap(
    widths: dict[str, Sequence[int]],
    path: str | Path,
    *,
    layers: Sequence[str] | None = None,
    history: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """A heat map of the weight width of every output channel (one row per layer) into ``path``, with the reward
    of every episode below it when ``history`` is given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(layers) if layers is not None else list(widths)
    longest = max((len(widths[n]) for n in names), default=1)
    grid = np.full((len(names), longest), np.nan)
    for row, name in enumerate(names):
        grid[row, : len(widths[name])] = widths[name]
    rows = 2 if history else 1
    fig = Figure(
        figsize=(max(6.0, min(16.0, 0.08 * longest + 3)), 0.35 * len(names) + 2.5 * rows), constrained_layout=True
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    bounds = np.arange(0.5, 9.0)
    cmap = ListedColormap([f"C{i}" for i in range(8)])
    image = axes[0].imshow(
        np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=cmap, norm=BoundaryNorm(bounds, 8)
    )
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].set_xlabel("output channel")
    axes[0].set_title("AutoQB weight width per output channel (1 = binary)")
    fig.colorbar(image, ax=axes[0], ticks=range(1, 9), label="bits")
    if history:
        episodes = [h["episode"] for h in history]
        rewards = [h["reward"] for h in history]
        axes[1].plot(episodes, rewards, ".", color="0.5", label="episode reward")
        axes[1].plot(episodes, np.maximum.accumulate(rewards), color="C3", label="best so far")
        axes[1].set_xlabel("episode")
        axes[1].set_ylabel("reward")
        axes[1].legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


# -- helpers -----------------------------------------------------------------------------------------------------
def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _train_loader(trainer: pl.Trainer) -> Any:
    trainer.fit_loop.setup_data()  # what the fit loop runs first; idempotent
    return trainer.train_dataloader


def _val_loader(trainer: pl.Trainer) -> Any:
    # the loop's own set-up (datamodule or `val_dataloaders`), when the fit validates at all
    if not trainer.enable_validation:
        return None
    trainer.fit_loop.epoch_loop.val_loop.setup_data()
    return trainer.val_dataloaders


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _take(loader: Any, count: int) -> list[Any]:
    """The first ``count`` batches of ``loader``, leaving the random generators of the loader and its samplers as
    they were (a shuffled loader with its own generator then serves the training the same order as without the
    search)."""
    if loader is None or count <= 0:
        return []
    generators = _loader_generators(loader)
    states = [g.get_state() for g in generators]
    out = []
    try:
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                break
    finally:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
    return out


def _loader_generators(loader: Any) -> list[torch.Generator]:
    found: dict[int, torch.Generator] = {}
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        inner = getattr(owner, "sampler", None)
        for candidate in (getattr(owner, "generator", None), getattr(inner, "generator", None)):
            if isinstance(candidate, torch.Generator):
                found[id(candidate)] = candidate
    return list(found.values())


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    return split_batch(batch, "training batch")[0]


__all__ = ["PLOT_NAME", "AutoQBCallback", "save_width_heatmap"]
