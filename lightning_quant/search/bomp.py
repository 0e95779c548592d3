"""BOMP-NAS: Bayesian optimisation over per-layer bit widths and architecture, with QAT fine-tuning in the loop."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from lightning_quant.allocation.cost import FLOAT_ACT_BITS, BudgetConstraint, check_budget, trace_macs
from lightning_quant.allocation.solvers import linear_objective_table, round_to_budget, validate_bit_choices
from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.io import load_weights_only
from lightning_quant.core.validation import check_choice, check_int
from lightning_quant.search.factory import ModelFactory
from lightning_quant.search.results import SearchResult
from lightning_quant.search.storage import TrialHeartbeat, fail_stale, make_storage
from lightning_quant.surgery.quantize import layer_candidates, quantize_model
from lightning_quant.surgery.spec import LayerSpec, QuantSpec
from lightning_quant.surgery.summary import quantization_summary

__all__ = ["Architecture", "FeasibleSampler", "MixedPrecisionSearch", "SearchSpace"]

log = logging.getLogger(__name__)

SamplerName = Literal["gp", "tpe", "random"]
CostName = Literal["size", "bops"]
_SPACE_ATTR = "lightning_quant:search_space"
_PROPOSAL_ATTR = "lightning_quant:proposal"
_OBJECTIVE_ATTR = "lightning_quant:objective"
_DIRECTIONS = ["maximize", "minimize"]
_SILENCED = (
    r".*does not have many workers",
    r".*smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


# -- the search space -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """One architecture of the space, measured before any training.

    Attributes:
        index: the index of each architecture choice (in the order of ``MixedPrecisionSearch.architecture``).
        choices: the choices' values, the factory's keyword arguments.
        layers: every layer the search quantizes, in registration order.
        layer_types: every quantizable layer -> its type name (what a ``QuantSpec`` resolves against).
        searched: the layers whose bits are searched (all but the fixed first and last ones).
        fixed_bits: the first and last layer's bits when ``first_last_bits`` fixes them.
        params: weight elements per layer.
        offset_bits: the quantized model's size (``quantization_summary``) less the searched layers' weight codes:
            float32 step sizes and zero points, biases, BatchNorm, and the fixed layers' codes.
        macs: multiply-accumulates per sample per layer (when BOPs are computed).
    """

    index: tuple[int, ...]
    choices: dict[str, Any]
    layers: tuple[str, ...]
    layer_types: dict[str, str]
    searched: tuple[str, ...]
    fixed_bits: dict[str, int]
    params: dict[str, int]
    offset_bits: int
    macs: dict[str, int] | None = None

    @property
    def key(self) -> str:
        """A file-name-safe label, ``width_multiplier=0.5_depth=8`` (``default`` without choices)."""
        if not self.choices:
            return "default"
        return "_".join(f"{k}={v}" for k, v in self.choices.items()).replace("/", "-").replace(" ", "")

    def size_bits(self, weight_bits: Mapping[str, int]) -> int:
        """The quantized model's size in bits: exact, from the widths alone (weight codes at their widths)."""
        return self.offset_bits + sum(self.params[n] * int(weight_bits[n]) for n in self.searched)

    def bops(self, weight_bits: Mapping[str, int], act_bits: Mapping[str, int | None]) -> int:
        """Bit operations per sample, ``sum MACs x weight bits x input bits`` (a float input counts 32 bits)."""
        if self.macs is None:
            raise ValueError("BOPs need the layers' MACs")
        total = 0
        for name in self.layers:
            w = weight_bits[name] if name in weight_bits else self.fixed_bits[name]
            a = act_bits.get(name)
            total += self.macs.get(name, 0) * int(w) * (FLOAT_ACT_BITS if a is None else int(a))
        return total


class SearchSpace:
    """The discrete space of a search and its budget repair.

    Optuna parameters (each an integer index, so that Gaussian-process samplers see an ordered variable):
    ``arch:<name>`` indexes ``architecture[name]``, ``w:<layer>`` the weight bits in ``weight_bits``, ``a:<layer>``
    the activation bits in ``act_bits_choices``. The layer parameters span every layer searched in *any*
    architecture, so the space is the same for every trial (a layer an architecture lacks ignores its parameter).
    """

    def __init__(
        self,
        architectures: Sequence[Architecture],
        arch_choices: Mapping[str, Sequence[Any]],
        weight_bits: Sequence[int],
        act_bits_choices: Sequence[int] | None,
        act_bits: int | None,
        first_last_bits: int | None,
        budgets: Mapping[str, float | None],
    ) -> None:
        self.architectures = {a.index: a for a in architectures}
        self.arch_choices = {k: list(v) for k, v in arch_choices.items()}
        self.weight_bits = tuple(weight_bits)
        self.act_bits_choices = None if act_bits_choices is None else tuple(act_bits_choices)
        self.act_bits = act_bits
        self.first_last_bits = first_last_bits
        self.budgets = dict(budgets)
        order: dict[str, None] = {}
        for arch in architectures:
            order.update(dict.fromkeys(arch.searched))
        self.searched_layers = tuple(order)
        all_layers: dict[str, None] = {}
        for arch in architectures:
            all_layers.update(dict.fromkeys(arch.layers))
        self.all_layers = tuple(all_layers)
        self.distributions: dict[str, BaseDistribution] = {}
        for name, values in self.arch_choices.items():
            if len(values) > 1:
                self.distributions[f"arch:{name}"] = IntDistribution(0, len(values) - 1)
        if len(self.weight_bits) > 1:
            for layer in self.searched_layers:
                self.distributions[f"w:{layer}"] = IntDistribution(0, len(self.weight_bits) - 1)
        if self.act_bits_choices is not None and len(self.act_bits_choices) > 1:
            for layer in self.searched_layers:
                self.distributions[f"a:{layer}"] = IntDistribution(0, len(self.act_bits_choices) - 1)
        self.feasible_archs = [a for a in architectures if self.arch_feasible(a)]

    # -- decoding ----------------------------------------------------------------------------------------------
    def decode(self, params: Mapping[str, int]) -> tuple[Architecture, dict[str, int], dict[str, int | None]]:
        """The architecture, weight bits and activation bits (every quantized layer) of a parameter set."""
        index = tuple(int(params.get(f"arch:{name}", 0)) for name in self.arch_choices)
        arch = self.architectures[index]
        weights = {n: self.weight_bits[int(params.get(f"w:{n}", 0))] for n in arch.searched}
        weights.update(arch.fixed_bits)
        acts: dict[str, int | None] = {}
        for n in arch.layers:
            if n in arch.fixed_bits:
                acts[n] = None if self.act_bits is None and self.act_bits_choices is None else self.first_last_bits
            elif self.act_bits_choices is not None:
                acts[n] = self.act_bits_choices[int(params.get(f"a:{n}", 0))]
            else:
                acts[n] = self.act_bits
        return arch, {n: weights[n] for n in arch.layers}, acts

    def encode(
        self, arch: Architecture, weight_bits: Mapping[str, int], act_bits: Mapping[str, int | None] | None = None
    ) -> dict[str, int]:
        """The parameter set of an allocation (widths must be in the choices; absent layers get index 0)."""
        params: dict[str, int] = {}
        for name, i in zip(self.arch_choices, arch.index, strict=True):
            if f"arch:{name}" in self.distributions:
                params[f"arch:{name}"] = i
        for layer in self.searched_layers:
            if f"w:{layer}" in self.distributions:
                params[f"w:{layer}"] = self.weight_bits.index(weight_bits[layer]) if layer in arch.searched else 0
            if f"a:{layer}" in self.distributions:
                assert self.act_bits_choices is not None and act_bits is not None
                bits = act_bits.get(layer) if layer in arch.searched else None
                params[f"a:{layer}"] = self.act_bits_choices.index(bits) if bits is not None else 0
        return params

    # -- budgets ------------------------------------------------------------------------------------------------
    def constraints(self, arch: Architecture, act_bits: Mapping[str, int | None]) -> list[BudgetConstraint]:
        """The budgets as linear costs of the searched layers' weight bits (activation bits held)."""
        out = []
        max_size = self.budgets.get("max_size_kib")
        if max_size is not None:
            out.append(
                BudgetConstraint(
                    "size_bits",
                    np.array([arch.params[n] for n in arch.searched], dtype=np.float64),
                    math.floor(max_size * 8192),
                    offset=float(arch.offset_bits),
                    display_scale=1 / 8192,
                    argument="max_size_kib",
                )
            )
        max_mbops = self.budgets.get("max_mbops")
        if max_mbops is not None:
            macs = arch.macs or {}

            def act(n: str) -> int:
                a = act_bits.get(n)
                return FLOAT_ACT_BITS if a is None else int(a)

            fixed = sum(macs.get(n, 0) * b * act(n) for n, b in arch.fixed_bits.items())
            out.append(
                BudgetConstraint(
                    "bops",
                    np.array([macs.get(n, 0) * act(n) for n in arch.searched], dtype=np.float64),
                    math.floor(max_mbops * 1e6),
                    offset=float(fixed),
                    display_scale=1e-6,
                    argument="max_mbops",
                )
            )
        return out

    def costs(self, arch: Architecture, weights: Mapping[str, int], acts: Mapping[str, int | None]) -> dict[str, Any]:
        """Size (bits and KiB), BOPs (when MACs are known) and each budget's slack (<= 0: met) of an allocation."""
        size_bits = arch.size_bits(weights)
        out: dict[str, Any] = {"size_bits": size_bits, "size_kib": size_bits / 8192, "mbops": None}
        if arch.macs is not None:
            out["mbops"] = arch.bops(weights, acts) / 1e6
        slack = {}
        if self.budgets.get("max_size_kib") is not None:
            slack["max_size_kib"] = out["size_kib"] - float(self.budgets["max_size_kib"])  # type: ignore[arg-type]
        if self.budgets.get("max_mbops") is not None:
            slack["max_mbops"] = out["mbops"] - float(self.budgets["max_mbops"])  # type: ignore[arg-type]
        out["slack"] = slack
        return out

    def _minimum(self, arch: Architecture) -> tuple[dict[str, int], dict[str, int | None]]:
        """The architecture's cheapest allocation: every searched width (weights and inputs) at its minimum."""
        params = {f"arch:{name}": i for name, i in zip(self.arch_choices, arch.index, strict=True)}
        _, weights, acts = self.decode(params)
        return weights, acts

    def arch_feasible(self, arch: Architecture) -> bool:
        """Whether the architecture meets every budget with all searched widths at their minimum."""
        weights, acts = self._minimum(arch)
        bits = np.array([weights[n] for n in arch.searched], dtype=np.float64)
        return all(c.feasible(bits) for c in self.constraints(arch, acts))

    def feasible(self, params: Mapping[str, int]) -> bool:
        arch, weights, acts = self.decode(params)
        bits = np.array([weights[n] for n in arch.searched], dtype=np.float64)
        return all(c.feasible(bits) for c in self.constraints(arch, acts))

    def repair(self, params: Mapping[str, int]) -> dict[str, int]:
        """The nearest allocation that meets every budget (``params`` itself when it does).

        Our rule (not from the paper): an architecture that cannot meet the budgets even at the lowest widths is
        replaced by the feasible architecture nearest in choice indices (ties: the cheaper one); then the
        weight widths are lowered, one choice step at a time, on the layer that saves the most budget per bit
        lost (the largest), until every budget holds (:func:`~lightning_quant.allocation.round_to_budget` with no
        fill, so nothing is raised); if BOPs still exceed the budget with every weight at its minimum, the
        searched activation widths go to their minimum as well.
        """
        params = dict(params)
        if self.feasible(params):
            return params
        arch, weights, acts = self.decode(params)
        if not self.arch_feasible(arch):
            nearest = min(
                self.feasible_archs,
                key=lambda a: (
                    sum(abs(i - j) for i, j in zip(a.index, arch.index, strict=True)),
                    a.size_bits(self._minimum(a)[0]),
                    a.index,
                ),
            )
            for name, i in zip(self.arch_choices, nearest.index, strict=True):
                if f"arch:{name}" in self.distributions:
                    params[f"arch:{name}"] = i
            arch, weights, acts = self.decode(params)
        if not arch.searched:
            return params
        constraints = self.constraints(arch, acts)
        if self.act_bits_choices is not None:
            at_minimum = np.full(len(arch.searched), self.weight_bits[0], dtype=np.float64)
            if not all(c.feasible(at_minimum) for c in constraints):
                for n in arch.searched:
                    params[f"a:{n}"] = 0
                arch, weights, acts = self.decode(params)
                constraints = self.constraints(arch, acts)
        if len(self.weight_bits) > 1:
            bits = round_to_budget(
                np.array([weights[n] for n in arch.searched], dtype=np.float64),
                linear_objective_table(np.ones(len(arch.searched)), self.weight_bits),
                constraints,
                self.weight_bits,
                fill=False,
            )
            for n, b in zip(arch.searched, bits, strict=True):
                params[f"w:{n}"] = self.weight_bits.index(int(b))
        return params

    def fingerprint(self) -> str:
        """What makes two runs the same study: choices, layers, budgets (a resumed study must match)."""
        return json.dumps(
            {
                "architecture": self.arch_choices,
                "weight_bits": list(self.weight_bits),
                "act_bits_choices": None if self.act_bits_choices is None else list(self.act_bits_choices),
                "act_bits": self.act_bits,
                "first_last_bits": self.first_last_bits,
                "searched_layers": list(self.searched_layers),
                "budgets": self.budgets,
            },
            sort_keys=True,
            default=str,
        )


class FeasibleSampler(BaseSampler):
    """Any Optuna sampler whose proposals are repaired to meet the budgets before the trial sees them.

    The whole space is sampled relatively: the base sampler's relative proposal (Gaussian process, multivariate
    TPE), completed by its own independent sampling for what it left out (its startup trials, univariate TPE),
    then :meth:`SearchSpace.repair`. The repaired values are the trial's parameters, so every trained trial is
    feasible and what a model of the study learns is what was trained. An enqueued trial (warm start, retry)
    keeps its own parameters.
    """

    def __init__(self, base: BaseSampler, space: SearchSpace) -> None:
        self.base = base
        self.space = space

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.space.distributions)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}
        base_space = self.base.infer_relative_search_space(study, trial)
        proposal = dict(self.base.sample_relative(study, trial, base_space)) if base_space else {}
        for name, distribution in search_space.items():
            if name not in proposal:
                proposal[name] = self.base.sample_independent(study, trial, name, distribution)
        proposal = {name: int(value) for name, value in proposal.items() if name in search_space}
        repaired = self.space.repair(proposal)
        if repaired != proposal:
            study._storage.set_trial_system_attr(trial._trial_id, _PROPOSAL_ATTR, json.dumps(proposal))
        return repaired

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


class _Surplus(optuna.TrialPruned):
    """The study already has its trials: this one is not run."""


# -- helpers ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's per-Trainer banners and known harmless warnings off for the search; restored afterwards."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    verbosity = optuna.logging.get_verbosity()
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            for message in _SILENCED:
                warnings.filterwarnings("ignore", message=message)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        optuna.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes of one machine (POSIX ``flock``; none elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    state = load_weights_only(path, "weights")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise QuantizationConfigError(
            f"`fp_checkpoint` {str(path)!r} holds a {type(state).__name__}, not a state_dict."
        )
    return state


# -- the search ------------------------------------------------------------------------------------------------------
class MixedPrecisionSearch:
    """Bayesian optimisation of per-layer bit widths (and architecture) with QAT fine-tuning in the loop.

    Paper: D. van Son, F. de Putter, S. Vogel, H. Corporaal, "BOMP-NAS: Bayesian Optimization Mixed Precision
    NAS", arXiv:2301.11810 (2023). From the paper (its abstract): Bayesian optimisation searches the architecture
    and the per-layer precision together, and quantization-aware fine-tuning (QAFT) runs *inside* the search
    loop, so that each candidate is scored as the quantized model it will be; reported: nearly 50 % smaller
    models than the peers on CIFAR-10 at equal accuracy, from a six times shorter search than the closest
    related work.

    Our choices (the paper's details are not public):

    * **Study**: an Optuna study with two objectives, validation accuracy (maximised) and the model's size in KiB
      or its BOPs in millions (minimised), sampled by Optuna's ``GPSampler`` (Gaussian process, log expected
      hypervolume improvement; ``"tpe"`` and ``"random"`` for comparison). Each budget (``max_size_kib``,
      ``max_mbops``) is a hard constraint recorded on every trial with ``Trial.set_constraint`` (Optuna 5's
      replacement of the deprecated ``constraints_func``; the GP models it, and the front keeps feasible trials only).
    * **Space**: one integer index per searched layer into ``weight_bits`` (an ordered variable for the GP), and
      per layer into ``act_bits_choices`` when given; one index per architecture choice (``architecture``, e.g.
      ``{"width_multiplier": [0.5, 0.75, 1.0], "depth": [8, 14]}``), passed to ``factory(**choices)``. The first
      and last layer stay at ``first_last_bits`` (the suite's convention; ``None`` searches them too).
    * **Sizes from the suite's cost account**: each architecture is built and quantized once before the search;
      a model's size is then ``offset + sum(params x bits)`` -- exactly ``quantization_summary(model)
      .quantized_bits`` (packed weight codes, float32 scales, biases, BatchNorm: the packed file's payload),
      checked again on every trained model; BOPs are ``sum MACs x weight bits x input bits`` from one traced
      forward. So **infeasible configurations are known before training, and none is trained**: the budget is
      enforced in the sampler (:class:`FeasibleSampler`): an infeasible proposal is repaired to the nearest
      feasible allocation (:meth:`SearchSpace.repair`) before the trial starts, and the trial records what it
      trained. An enqueued trial that exceeds the budget is not trained (pruned, with the reason). Before any
      training: a budget no configuration meets, an empty space, and a factory that fails to build raise
      :class:`~lightning_quant.QuantizationConfigError`.
    * **Trial**: build the model, start from float weights -- ``fp_checkpoint`` if it fits the architecture,
      else float weights trained once per architecture (``fp_epochs``) and shared by every trial of it (and every
      worker on the machine) through ``<workdir>/fp/`` -- then ``qat_epochs`` of QAT with a Lightning ``Trainer``
      and ``QuantizationAwareTraining(spec=<the trial's QuantSpec>)``, and the validation metric ``monitor`` of
      the last epoch. Every trial is seeded with ``seed`` (common random numbers: trials differ by their
      configuration only). A trial whose training raises is recorded as failed with its error (user attribute
      ``error``) and the search goes on.
    * **Storage and workers**: a SQLite file ``<workdir>/search.db`` by default; any Optuna storage URL
      (``journal:///path.log`` for processes on one machine, ``postgresql://...`` for several machines) for
      several workers, each started the same way (``lightning-quant search --config ... --storage URL
      --study-name NAME``). ``n_trials`` counts the study's finished trials (complete or failed), whoever ran
      them: a trial that would exceed it is not run (among trials started together, the earliest wins), and a
      worker returns when the study has ``n_trials`` of them. A killed worker's running trial is retried once its
      heartbeat is ``grace_period`` seconds old (see :mod:`lightning_quant.search.storage`); a resumed search
      never repeats a finished trial. A study remembers its space and budgets and refuses to resume with others.
    * **Warm start** (none of the paper's peers do this): the uniform allocations (every searched layer at one
      width of ``weight_bits``) and the allocations of ``warm_start_specs`` (QuantSpec files, e.g. from QBitOpt
      or OMPQ) are enqueued as the first trials by the worker that creates the study (so never twice), those over
      budget skipped.
    * **Outputs** (``<workdir>``): the Pareto front as a table (``pareto_front.md``, ``.csv``), a plot
      (``pareto_front.png``) and one QuantSpec YAML per front trial (``specs/trial_<n>.yaml``, for
      ``QuantizationAwareTraining(spec=QuantSpec.load(path))``); a progress bar over the study's trials.

    Args:
        factory: ``factory(**choices) -> LightningModule``, a new untrained model of one architecture (a
            :class:`~lightning_quant.search.ModelFactory` such as
            :class:`~lightning_quant.search.ImageClassifierFactory`, or any callable).
        datamodule: training and validation data of every trial.
        weight_bits: the widths a searched layer may take (1-8; 1 is binary).
        act_bits: input-activation bits of every quantized layer when ``act_bits_choices`` is not given
            (``None``: weight-only quantization).
        act_bits_choices: search the input bits of each layer among these widths (2-8).
        architecture: architecture choices, name -> the values to try (listed in a meaningful order: the GP
            treats the index as ordered).
        objective: the second objective, ``"size"`` (KiB) or ``"bops"`` (millions per sample).
        max_size_kib: hard budget on the quantized model's size in KiB (``quantization_summary``'s account).
        max_mbops: hard budget on bit operations per sample, in millions.
        first_last_bits: fixed bits of the first and last quantized layer; ``None`` searches them too.
        exclude: name patterns of layers to keep in float.
        layer_spec: the recipe of every quantized layer apart from its bits (granularity, scale mode, observers).
        n_trials: finished trials the study should have.
        sampler: ``"gp"`` (``GPSampler``), ``"tpe"`` or ``"random"``.
        n_startup_trials: complete trials before the GP or TPE model is used (random ones before that; the warm
            starts count).
        fp_checkpoint: float weights of the factory's model (a Lightning ``.ckpt`` or a ``state_dict`` file),
            used by every architecture they fit.
        fp_epochs: epochs of float training for an architecture that ``fp_checkpoint`` does not fit.
        qat_epochs: epochs of the QAT fine-tune of each trial.
        trainer_kwargs: extra ``Trainer`` arguments of the float training and the fine-tunes (``accelerator``,
            ``limit_train_batches``, ``limit_val_batches``, ...); not ``callbacks``, ``max_epochs`` or
            ``check_val_every_n_epoch``.
        num_calibration_batches: QAT's activation calibration batches.
        monitor: the validation metric to maximise, as the model logs it.
        warm_start_uniform: enqueue the uniform allocations first.
        warm_start_specs: QuantSpec files (``.yaml``/``.json``) to enqueue (widths not in ``weight_bits`` are
            lowered to the next allowed one).
        warm_start_architecture: the architecture of the uniform warm starts (default: each choice's first value).
        storage: an Optuna storage URL; default ``sqlite:///<workdir>/search.db``.
        study_name: the study's name in the storage.
        workdir: outputs, the default database and the shared float weights.
        heartbeat_interval: seconds between heartbeats of a running trial.
        grace_period: seconds without a heartbeat after which a running trial counts as stale (default: twice the
            interval, at least 10 s).
        max_retry: how often a stale trial is retried.
        seed: seed of the sampler (combined with the study's trial count, and with the process id when
            ``storage`` is given, so that resumed runs and parallel workers draw new proposals), and of every
            trial's training.
        progress_bar: show a progress bar over the study's trials.

    Example:
        >>> search = MixedPrecisionSearch(  # doctest: +SKIP
        ...     ImageClassifierFactory(backbone_args={"depth": 8, "in_channels": 1}),
        ...     DigitsDataModule(image_size=16),
        ...     weight_bits=[2, 3, 4, 8],
        ...     architecture={"width_multiplier": [0.5, 1.0]},
        ...     max_size_kib=20,
        ...     n_trials=20,
        ... )
        >>> result = search.run()  # doctest: +SKIP
        >>> print(result.table())  # doctest: +SKIP
    """

    SAMPLERS: ClassVar[tuple[str, ...]] = ("gp", "tpe", "random")
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("size", "bops")
    _RESERVED_TRAINER_KEYS: ClassVar[tuple[str, ...]] = ("callbacks", "max_epochs", "check_val_every_n_epoch")

    def __init__(
        self,
        factory: ModelFactory | Callable[..., pl.LightningModule],
        datamodule: pl.LightningDataModule,
        *,
        weight_bits: list[int] | None = None,
        act_bits: int | None = 8,
        act_bits_choices: list[int] | None = None,
        architecture: dict[str, list[Any]] | None = None,
        objective: CostName = "size",
        max_size_kib: float | None = None,
        max_mbops: float | None = None,
        first_last_bits: int | None = 8,
        exclude: list[str] | None = None,
        layer_spec: LayerSpec | None = None,
        n_trials: int = 20,
        sampler: SamplerName = "gp",
        n_startup_trials: int = 10,
        fp_checkpoint: str | None = None,
        fp_epochs: int = 3,
        qat_epochs: int = 1,
        trainer_kwargs: dict[str, Any] | None = None,
        num_calibration_batches: int = 16,
        monitor: str = "val/acc",
        warm_start_uniform: bool = True,
        warm_start_specs: list[str] | None = None,
        warm_start_architecture: dict[str, Any] | None = None,
        storage: str | None = None,
        study_name: str = "mixed_precision_search",
        workdir: str = "search",
        heartbeat_interval: int = 30,
        grace_period: int | None = None,
        max_retry: int = 2,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        if not callable(factory):
            raise QuantizationConfigError(
                f"`factory` must be callable as `factory(**choices) -> LightningModule`, got {type(factory).__name__}. "
                "HINT: `ImageClassifierFactory(backbone=...)`."
            )
        if not isinstance(datamodule, pl.LightningDataModule):
            raise QuantizationConfigError(
                f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}."
            )
        self.weight_bits = validate_bit_choices(
            [2, 3, 4, 8] if weight_bits is None else weight_bits, "weight_bits", allow_binary=True
        )
        if act_bits is not None:
            validate_bits("act_bits", act_bits)
        self.act_bits_choices = (
            None if act_bits_choices is None else validate_bit_choices(act_bits_choices, "act_bits_choices")
        )
        self.architecture = self._check_architecture(architecture)
        check_choice("objective", objective, self.OBJECTIVES)
        check_budget("max_size_kib", max_size_kib)
        check_budget("max_mbops", max_mbops)
        if first_last_bits is not None:
            validate_bits("first_last_bits", first_last_bits, allow_binary=True)
        if layer_spec is not None and not isinstance(layer_spec, LayerSpec):
            raise QuantizationConfigError(f"`layer_spec` must be a LayerSpec or None, got {type(layer_spec).__name__}.")
        check_int("n_trials", n_trials, minimum=1, fix="pass e.g. `n_trials=20`.")
        check_choice("sampler", sampler, self.SAMPLERS)
        check_int("n_startup_trials", n_startup_trials, minimum=0, fix="pass e.g. `n_startup_trials=10`.")
        check_int("fp_epochs", fp_epochs, minimum=1, fix="pass e.g. `fp_epochs=3`.")
        check_int("qat_epochs", qat_epochs, minimum=1, fix="pass e.g. `qat_epochs=1`.")
        check_int(
            "num_calibration_batches", num_calibration_batches, minimum=0, fix="pass e.g. `num_calibration_batches=16`."
        )
        check_int(
            "heartbeat_interval", heartbeat_interval, minimum=1, fix="pass e.g. `heartbeat_interval=30` (seconds)."
        )
        if grace_period is not None:
            check_int(
                "grace_period",
                grace_period,
                minimum=heartbeat_interval + 1,
                fix="it must exceed the heartbeat interval.",
            )
        check_int("max_retry", max_retry, minimum=0, fix="pass e.g. `max_retry=2`.")
        check_int("seed", seed, fix="pass e.g. `seed=0`.")
        trainer_kwargs = dict(trainer_kwargs or {})
        reserved = sorted(set(trainer_kwargs) & set(self._RESERVED_TRAINER_KEYS))
        if reserved:
            raise QuantizationConfigError(
                f"`trainer_kwargs` must not set {reserved}: the search sets them for each trial. HINT: use "
                "`fp_epochs` and `qat_epochs` for the epochs; the QAT callback is added by the search."
            )
        if fp_checkpoint is not None and not Path(fp_checkpoint).is_file():
            raise QuantizationConfigError(
                f"`fp_checkpoint` file {fp_checkpoint!r} does not exist. HINT: a Lightning .ckpt or a torch.save'd "
                "state_dict of the factory's model, or None to train float weights in the search."
            )
        specs = [Path(p) for p in (warm_start_specs or [])]
        for path in specs:
            if not path.is_file():
                raise QuantizationConfigError(f"`warm_start_specs` file {str(path)!r} does not exist.")
        if not isinstance(study_name, str) or not study_name:
            raise QuantizationConfigError(f"`study_name` must be a non-empty string, got {study_name!r}.")
        self.factory = factory
        self.datamodule = datamodule
        self.act_bits = act_bits
        self.objective = objective
        self.budgets: dict[str, float | None] = {"max_size_kib": max_size_kib, "max_mbops": max_mbops}
        self.first_last_bits = first_last_bits
        self.exclude = tuple(exclude or ())
        self.layer_spec = layer_spec or LayerSpec()
        self.n_trials = n_trials
        self.sampler = sampler
        self.n_startup_trials = n_startup_trials
        self.fp_checkpoint = fp_checkpoint
        self.fp_epochs = fp_epochs
        self.qat_epochs = qat_epochs
        self.trainer_kwargs = trainer_kwargs
        self.num_calibration_batches = num_calibration_batches
        self.monitor = monitor
        self.warm_start_uniform = warm_start_uniform
        self.warm_start_specs = specs
        self.warm_start_architecture = dict(warm_start_architecture or {})
        self.workdir = Path(workdir)
        self.storage_url = storage or f"sqlite:///{(self.workdir / 'search.db').as_posix()}"
        self.shared_storage = storage is not None
        self.study_name = study_name
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period if grace_period is not None else max(2 * heartbeat_interval, 10)
        self.max_retry = max_retry
        self.seed = seed
        self.progress_bar = progress_bar
        self.space: SearchSpace | None = None
        self._study: optuna.Study | None = None
        self._created = False

    @staticmethod
    def _check_architecture(architecture: object) -> dict[str, list[Any]]:
        if architecture is None:
            return {}
        if not isinstance(architecture, Mapping):
            raise QuantizationConfigError(
                f"`architecture` must map choice names to lists of values, got {type(architecture).__name__}. "
                "HINT: `architecture={'width_multiplier': [0.5, 1.0]}`."
            )
        out = {}
        for name, values in architecture.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise QuantizationConfigError(
                    f"`architecture[{name!r}]` must be a non-empty list of values, got {values!r}. "
                    f"HINT: `architecture={{{name!r}: [0.5, 1.0]}}`."
                )
            if len(set(map(repr, values))) != len(values):
                raise QuantizationConfigError(f"`architecture[{name!r}]` repeats a value: {list(values)}.")
            out[str(name)] = list(values)
        return out

    # -- preparation (before any training) -------------------------------------------------------------------------
    def _build(self, choices: Mapping[str, Any]) -> pl.LightningModule:
        try:
            model = self.factory(**choices)
        except Exception as err:
            where = f"with {dict(choices)}" if choices else "with no architecture choice"
            raise QuantizationConfigError(
                f"`factory` failed to build the model {where}: {type(err).__name__}: {err}. HINT: every combination "
                "of `architecture` must be a valid model; the factory is called as `factory(**choices)`."
            ) from err
        if not isinstance(model, pl.LightningModule):
            raise QuantizationConfigError(
                f"`factory` must return a LightningModule, got {type(model).__name__} for {dict(choices)}. "
                "HINT: wrap the network, e.g. `ImageClassifier(backbone)`."
            )
        return model

    def _layer(self, weight_bits: int, act_bits: int | None, frozen: bool = False) -> LayerSpec:
        return dataclasses.replace(self.layer_spec, weight_bits=weight_bits, act_bits=act_bits, frozen=frozen)

    def spec_for(self, arch: Architecture, weights: Mapping[str, int], acts: Mapping[str, int | None]) -> QuantSpec:
        """The trial's recipe: every quantized layer with its own bits (``first_last_bits`` already applied)."""
        return QuantSpec(
            default=self.layer_spec,
            include=arch.layers,
            first_last_bits=None,
            layers={n: self._layer(weights[n], acts[n], frozen=n in arch.fixed_bits) for n in arch.layers},
        )

    def _example_input(self, model: pl.LightningModule) -> Any:
        if model.example_input_array is not None:
            return model.example_input_array
        self.datamodule.setup("validate")
        batch = next(iter(self.datamodule.val_dataloader()))
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return x[:1]

    def _measure(self, index: tuple[int, ...]) -> Architecture:
        choices = {name: values[i] for (name, values), i in zip(self.architecture.items(), index, strict=True)}
        model = self._build(choices)
        candidates = layer_candidates(model)
        if not candidates:
            raise QuantizationConfigError(
                f"The model built with {choices or 'no choices'} has no Conv/Linear layer to quantize."
            )
        selected = QuantSpec(exclude=self.exclude, first_last_bits=None).select(candidates)
        if not selected:
            raise QuantizationConfigError(f"`exclude` = {list(self.exclude)} leaves no layer to quantize.")
        fixed: dict[str, int] = {}
        if self.first_last_bits is not None:
            fixed = {selected[0]: self.first_last_bits, selected[-1]: self.first_last_bits}
        searched = tuple(n for n in selected if n not in fixed)
        arch = Architecture(index, choices, tuple(selected), candidates, searched, fixed, {}, 0)
        low = self.weight_bits[0]
        weights = {n: fixed.get(n, low) for n in selected}
        first_act = None if self.act_bits is None and self.act_bits_choices is None else self.first_last_bits
        default_act = self.act_bits if self.act_bits_choices is None else self.act_bits_choices[0]
        acts = {n: first_act if n in fixed else default_act for n in selected}
        reference = copy.deepcopy(model)
        quantize_model(reference, self.spec_for(arch, weights, acts))
        summary = quantization_summary(reference)
        params = {row.name: row.params for row in summary.rows}
        offset = summary.quantized_bits - sum(params[n] * low for n in searched)
        macs = None
        if self.objective == "bops" or self.budgets["max_mbops"] is not None:
            macs = trace_macs(reference, self._example_input(model))
        return dataclasses.replace(arch, params=params, offset_bits=int(offset), macs=macs)

    def prepare(self) -> SearchSpace:
        """Build and measure every architecture, check the space and the budgets; no training.

        Raises:
            QuantizationConfigError: the factory fails or returns no LightningModule, the space is empty, or no
                configuration meets the budgets (the message gives the smallest achievable cost).
        """
        if self.space is not None:
            return self.space
        indices = list(itertools.product(*(range(len(v)) for v in self.architecture.values())))
        architectures = [self._measure(index) for index in indices]
        space = SearchSpace(
            architectures,
            self.architecture,
            self.weight_bits,
            self.act_bits_choices,
            self.act_bits,
            self.first_last_bits,
            self.budgets,
        )
        if not space.distributions:
            raise QuantizationConfigError(
                "The search space is empty: nothing varies (one width in `weight_bits`, no `act_bits_choices` with "
                "two widths, no `architecture` choice with two values; searched layers: "
                f"{list(space.searched_layers)}). HINT: allow several widths, e.g. `weight_bits=[2, 3, 4, 8]`, or set "
                "`first_last_bits=None`."
            )
        if not space.feasible_archs:
            lowest = []
            for arch in architectures:
                weights, acts = space._minimum(arch)
                costs = space.costs(arch, weights, acts)
                lowest.append((costs["size_kib"], costs["mbops"], arch.choices))
            size, mbops, choices = min(lowest, key=lambda t: (t[0], t[1] or 0))
            budget = ", ".join(f"{k}={v}" for k, v in self.budgets.items() if v is not None)
            smallest = f"{size:.3f} KiB" + (f" / {mbops:.3f} MBOPs" if mbops is not None else "")
            where = f"architecture {choices}" if choices else "the model"
            raise QuantizationConfigError(
                f"No configuration of the search space meets the budget ({budget}): the smallest is {smallest} "
                f"({where} with every searched width at its minimum, {self.weight_bits[0]} weight bits). HINT: raise "
                "the budget, allow fewer bits or smaller architectures, or lower `first_last_bits` (or set it to None)."
            )
        self.space = space
        return space

    # -- the study ---------------------------------------------------------------------------------------------------
    def _base_sampler(self, seed: int) -> BaseSampler:
        if self.sampler == "gp":
            return optuna.samplers.GPSampler(
                seed=seed,
                n_startup_trials=self.n_startup_trials,
                independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            )
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials, multivariate=True)
        return optuna.samplers.RandomSampler(seed=seed)

    def open_study(self) -> optuna.Study:
        """Create the study or load it (checking that it searches the same space), with this worker's sampler."""
        if self._study is not None:
            return self._study
        space = self.prepare()
        storage = make_storage(
            self.storage_url,
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            max_retry=self.max_retry,
        )
        with _quiet():
            try:  # exactly one worker creates the study (and enqueues the warm starts)
                study = optuna.create_study(storage=storage, study_name=self.study_name, directions=_DIRECTIONS)
                self._created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=self.study_name, storage=storage)
                self._created = False
        fingerprint = space.fingerprint()
        if self._created:
            study.set_user_attr(_SPACE_ATTR, fingerprint)
            study.set_user_attr(_OBJECTIVE_ATTR, self.objective)
        stored = study.user_attrs.get(_SPACE_ATTR)
        for _ in range(50):  # a worker that started with the creator: give it a moment to write the space
            if stored is not None:
                break
            time.sleep(0.1)
            stored = study.user_attrs.get(_SPACE_ATTR)
        directions = [d.name.lower() for d in study.directions]
        if stored is None:
            study.set_user_attr(_SPACE_ATTR, fingerprint)
            study.set_user_attr(_OBJECTIVE_ATTR, self.objective)
        elif (
            stored != fingerprint
            or study.user_attrs.get(_OBJECTIVE_ATTR) != self.objective
            or directions != _DIRECTIONS
        ):
            raise QuantizationConfigError(
                f"Study {self.study_name!r} in {self.storage_url!r} was created with another search space, budget or "
                f"objective (stored: {stored}, objective {study.user_attrs.get(_OBJECTIVE_ATTR)!r}). HINT: use a new "
                "`study_name`, or the settings it was created with."
            )
        existing = len(study.get_trials(deepcopy=False))
        seed = self.seed
        if existing or self.shared_storage:
            # a resumed run or a parallel worker must not replay the first run's proposals
            entropy = [self.seed, existing] + ([os.getpid()] if self.shared_storage else [])
            seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        study.sampler = FeasibleSampler(self._base_sampler(seed), space)
        self._study = study
        return study

    def warm_starts(self) -> list[tuple[dict[str, int], str]]:
        """The warm-start parameter sets with their origin (uniform allocations, then ``warm_start_specs``)."""
        space = self.prepare()
        unknown = sorted(set(self.warm_start_architecture) - set(self.architecture))
        if unknown:
            raise QuantizationConfigError(
                f"`warm_start_architecture` names {unknown}, which are not in `architecture` {list(self.architecture)}."
            )
        index = []
        for name, values in self.architecture.items():
            value = self.warm_start_architecture.get(name, values[0])
            if value not in values:
                raise QuantizationConfigError(
                    f"`warm_start_architecture[{name!r}]` = {value!r} is not one of `architecture[{name!r}]` {values}."
                )
            index.append(values.index(value))
        base = space.architectures[tuple(index)]
        out: list[tuple[dict[str, int], str]] = []
        if self.warm_start_uniform:
            for bits in self.weight_bits:
                weights = {n: bits for n in base.searched}
                acts = None
                if self.act_bits_choices is not None:
                    act = bits if bits in self.act_bits_choices else self.act_bits_choices[-1]
                    acts = {n: act for n in base.searched}
                out.append((space.encode(base, weights, acts), f"uniform {bits}-bit"))
        for path in self.warm_start_specs:
            out.append((self._params_of_spec(path, base), f"spec {path.name}"))
        return out

    def _params_of_spec(self, path: Path, preferred: Architecture) -> dict[str, int]:
        space = self.prepare()
        try:
            spec = QuantSpec.load(path)
        except Exception as err:
            raise QuantizationConfigError(f"`warm_start_specs` file {str(path)!r} is not a QuantSpec: {err}") from err
        archs = [preferred] + [a for a in space.architectures.values() if a is not preferred]
        for arch in archs:
            try:
                resolved = spec.resolve(arch.layer_types)
            except QuantizationConfigError:
                continue
            if not set(arch.searched) <= set(resolved):
                continue
            weights, acts = {}, {}
            for n in arch.searched:
                bits = resolved[n].weight_bits
                if not isinstance(bits, int):
                    raise QuantizationConfigError(
                        f"`warm_start_specs` file {str(path)!r} gives layer {n!r} per-channel widths; the search "
                        "allocates one width per layer."
                    )
                weights[n] = max([b for b in self.weight_bits if b <= bits] or [self.weight_bits[0]])
                if self.act_bits_choices is not None:
                    a = resolved[n].act_bits or self.act_bits_choices[-1]
                    acts[n] = max([b for b in self.act_bits_choices if b <= a] or [self.act_bits_choices[0]])
            return space.encode(arch, weights, acts if self.act_bits_choices is not None else None)
        raise QuantizationConfigError(
            f"`warm_start_specs` file {str(path)!r} fits no architecture of the space: its layers do not match the "
            f"searched layers {list(preferred.searched)[:6]}... HINT: save it from a model the factory builds."
        )

    def _enqueue_warm_starts(self, study: optuna.Study) -> None:
        assert self.space is not None
        for params, origin in self.warm_starts():
            if not self.space.feasible(params):
                log.info("warm start %s exceeds the budget: not enqueued", origin)
                continue
            study.enqueue_trial(params, user_attrs={"origin": origin}, skip_if_exists=True)

    # -- counting trials ---------------------------------------------------------------------------------------------
    @staticmethod
    def _counts(trial: FrozenTrial) -> bool:
        """Whether a trial counts towards ``n_trials``: complete, or failed by its own error (not gone stale)."""
        return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)

    def _tally(self, study: optuna.Study) -> tuple[int, int]:
        trials = study.get_trials(deepcopy=False)
        done = sum(1 for t in trials if self._counts(t))
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        return done, running

    def _check_surplus(self, study: optuna.Study, trial: optuna.Trial, n_trials: int) -> None:
        me = study._storage.get_trial(trial._trial_id)
        mine = (me.datetime_start, me.number)
        ahead = 0
        for t in study.get_trials(deepcopy=False):
            if t.number == me.number:
                continue
            if self._counts(t) or (
                t.state == TrialState.RUNNING and t.datetime_start is not None and (t.datetime_start, t.number) < mine
            ):
                ahead += 1
        if ahead >= n_trials:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"the study already has {n_trials} finished or running trials")

    # -- one trial -----------------------------------------------------------------------------------------------------
    def _trainer(self, **overrides: Any) -> pl.Trainer:
        kwargs: dict[str, Any] = {
            "accelerator": "auto",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(self.workdir / "lightning"),
        }
        kwargs.update(self.trainer_kwargs)
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)

    def _float_weights(self, model: pl.LightningModule, arch: Architecture) -> str:
        """Load the architecture's float weights into ``model``: the checkpoint, the cache, or train them now."""
        if self.fp_checkpoint is not None:
            try:
                model.load_state_dict(_state_dict_of(Path(self.fp_checkpoint)), strict=True)
                return "checkpoint"
            except RuntimeError:
                pass  # another architecture: trained below
        cache = self.workdir / "fp" / f"{arch.key}.pt"
        with _file_lock(cache.with_suffix(".lock")):
            if cache.exists():
                model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True), strict=True)
                return "cache"
            pl.seed_everything(self.seed, workers=True, verbose=False)
            trainer = self._trainer(max_epochs=self.fp_epochs, limit_val_batches=0)
            trainer.fit(model, datamodule=self.datamodule)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, cache)
            return "trained"

    def train_float_weights(self) -> dict[str, str]:
        """Train (or find) the float weights of every architecture now, e.g. before starting several workers.

        Returns:
            Architecture key -> where its weights come from: ``"checkpoint"``, ``"cache"`` or ``"trained"``.
        """
        space = self.prepare()
        with _quiet():
            return {a.key: self._float_weights(self._build(a.choices), a) for a in space.architectures.values()}

    def _fine_tune(self, arch: Architecture, spec: QuantSpec) -> tuple[float, pl.LightningModule, str]:
        model = self._build(arch.choices)
        source = self._float_weights(model, arch)
        pl.seed_everything(self.seed, workers=True, verbose=False)
        qat = QuantizationAwareTraining(spec=spec, num_calibration_batches=self.num_calibration_batches)
        trainer = self._trainer(max_epochs=self.qat_epochs, check_val_every_n_epoch=self.qat_epochs, callbacks=[qat])
        trainer.fit(model, datamodule=self.datamodule)
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise QuantizationConfigError(
                f"`monitor` = {self.monitor!r} was not logged by the validation after the QAT fine-tune; logged: "
                f"{sorted(trainer.callback_metrics)}. HINT: name a metric the model logs in `validation_step`, and "
                "keep `limit_val_batches` above 0."
            )
        return float(value), model, source

    def _objective(self, study: optuna.Study, n_trials: int) -> Callable[[optuna.Trial], tuple[float, float]]:
        space = self.space
        assert space is not None

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            self._check_surplus(study, trial, n_trials)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            params = {name: trial.suggest_int(name, d.low, d.high) for name, d in space.distributions.items()}  # type: ignore[attr-defined]
            arch, weights, acts = space.decode(params)
            costs = space.costs(arch, weights, acts)
            spec = self.spec_for(arch, weights, acts)
            for key, value in (
                ("architecture", arch.choices),
                ("weight_bits", weights),
                ("act_bits", acts),
                ("size_bits", costs["size_bits"]),
                ("size_kib", costs["size_kib"]),
                ("mbops", costs["mbops"]),
                ("spec", spec.to_dict()),
            ):
                trial.set_user_attr(key, value)
            for name, slack in costs["slack"].items():
                trial.set_constraint(name, slack)
            if any(s > 0 for s in costs["slack"].values()):
                reason = f"over budget ({costs['slack']}): known before training, not trained"
                trial.set_user_attr("skipped", reason)
                raise optuna.TrialPruned(reason)
            # the heartbeat (storages without Optuna's own) runs until the objective returns; Optuna's tell follows
            with TrialHeartbeat(study._storage, trial._trial_id, self.heartbeat_interval):
                try:
                    accuracy, model, source = self._fine_tune(arch, spec)
                    measured = quantization_summary(model).quantized_bits
                except Exception as err:
                    trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                    log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
                    raise
                trial.set_user_attr("measured_size_bits", int(measured))
                trial.set_user_attr("float_weights", source)
                trial.set_user_attr("accuracy", accuracy)
            if measured != costs["size_bits"]:
                log.warning(
                    "trial %d: the trained model measures %d bits, the cost account said %d",
                    trial.number,
                    measured,
                    costs["size_bits"],
                )
            cost = costs["size_kib"] if self.objective == "size" else costs["mbops"]
            return accuracy, float(cost)

        return objective

    # -- the loop ------------------------------------------------------------------------------------------------------
    def run(self, n_trials: int | None = None, *, poll_seconds: float = 1.0) -> SearchResult:
        """Run trials until the study has ``n_trials`` finished ones; write and return the results.

        Args:
            n_trials: overrides the constructor's ``n_trials`` (the study's total, whoever runs the trials).
            poll_seconds: while the last trials run in other workers, how often to look at the study.

        Returns:
            The :class:`~lightning_quant.search.SearchResult` of the whole study (also written to ``workdir``).
        """
        n_trials = self.n_trials if n_trials is None else n_trials
        check_int("n_trials", n_trials, minimum=1, fix="pass e.g. `n_trials=20`.")
        start = time.perf_counter()
        study = self.open_study()
        from tqdm import tqdm

        with _quiet():
            if self._created:
                self._enqueue_warm_starts(study)
                self._created = False
            objective = self._objective(study, n_trials)
            done, _ = self._tally(study)
            bar = tqdm(
                total=n_trials, initial=min(done, n_trials), desc="search", unit="trial", disable=not self.progress_bar
            )
            try:
                while True:
                    fail_stale(study, grace_period=self.grace_period, max_retry=self.max_retry)
                    done, running = self._tally(study)
                    bar.n = min(done, n_trials)
                    bar.refresh()
                    if done >= n_trials:
                        break
                    if done + running >= n_trials:
                        time.sleep(poll_seconds)  # the last trials run elsewhere (or went stale: retried above)
                        continue
                    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                    self._show_best(bar, study)
            finally:
                bar.close()
        result = self.result()
        result = dataclasses.replace(result, seconds=time.perf_counter() - start)
        result.save(self.workdir)
        return result

    def _show_best(self, bar: Any, study: optuna.Study) -> None:
        front = study.best_trials
        if front:
            best = max(front, key=lambda t: t.values[0])
            bar.set_postfix(front=len(front), best=f"{100 * best.values[0]:.1f}%@{best.values[1]:.3g}", refresh=False)

    def result(self) -> SearchResult:
        """The study's trials and Pareto front so far (read from the storage)."""
        study = self.open_study()
        assert self.space is not None
        return SearchResult.from_study(study, self.objective, self.budgets, self.space.all_layers)
