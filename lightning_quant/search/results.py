"""What a search leaves: one record per trial, the Pareto front as a table and a plot, and the front's QuantSpecs."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from lightning_quant.surgery.spec import QuantSpec

__all__ = ["SearchResult", "TrialRecord", "hypervolume_2d", "pareto_mask"]


def pareto_mask(accuracy: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """Which points no other point dominates (higher-or-equal accuracy at lower-or-equal cost, one strictly).

    >>> pareto_mask([0.9, 0.8, 0.95, 0.7], [4.0, 2.0, 8.0, 3.0]).tolist()
    [True, True, True, False]
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    cst = np.asarray(cost, dtype=np.float64)
    keep = np.ones(acc.shape[0], dtype=bool)
    for i in range(acc.shape[0]):
        dominated = (acc >= acc[i]) & (cst <= cst[i]) & ((acc > acc[i]) | (cst < cst[i]))
        keep[i] = not dominated.any()
    return keep


def hypervolume_2d(accuracy: Sequence[float], cost: Sequence[float], reference: tuple[float, float]) -> float:
    """The area that the points dominate inside the box from ``reference = (accuracy_ref, cost_ref)``.

    Accuracy is maximised and cost minimised; points with accuracy at or below the reference accuracy or cost at
    or above the reference cost add nothing. Computed exactly by a sweep over the points sorted by cost.

    >>> hypervolume_2d([0.5, 0.8], [1.0, 3.0], reference=(0.0, 4.0))  # 0.5 x 3 + (0.8 - 0.5) x 1
    1.8
    """
    acc_ref, cost_ref = reference
    points = sorted(
        (c, a) for a, c in zip(accuracy, cost, strict=True) if a > acc_ref and c < cost_ref and np.isfinite(a)
    )
    volume, best = 0.0, acc_ref
    for c, a in points:
        if a > best:
            volume += (a - best) * (cost_ref - c)
            best = a
    return round(volume, 12)


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search.

    Attributes:
        number: Optuna's trial number.
        state: ``"COMPLETE"``, ``"FAIL"`` (the error in ``error``), ``"PRUNED"`` (not trained: ``error`` says why),
            ``"RUNNING"`` or ``"WAITING"``.
        architecture: the architecture choices.
        weight_bits: weight bits of every quantized layer (searched and fixed ones).
        act_bits: input bits of every quantized layer (``None``: float input).
        size_kib: the quantized model's size (``quantization_summary``'s account: packed weights, float32 scales,
            biases and BatchNorm), known before training.
        mbops: bit operations per sample in millions, when the search computes BOPs.
        accuracy: the validation metric after the QAT fine-tune (``None`` unless complete).
        feasible: whether every budget holds.
        origin: ``"sampler"``, ``"uniform <b>-bit"``, ``"spec <file>"``, or ``"retry of <n>"``.
        error: why a trial failed or was not trained.
        spec: the trial's recipe, for ``QuantizationAwareTraining(spec=...)``.
    """

    number: int
    state: str
    architecture: dict[str, Any]
    weight_bits: dict[str, int]
    act_bits: dict[str, int | None]
    size_kib: float | None
    mbops: float | None
    accuracy: float | None
    feasible: bool
    origin: str
    error: str | None = None
    spec: QuantSpec | None = field(default=None, compare=False)

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        retried = trial.system_attrs.get("failed_trial")
        origin = attrs.get("origin", "sampler") if retried is None else f"retry of {retried}"
        spec = QuantSpec.from_dict(attrs["spec"]) if "spec" in attrs else None
        return cls(
            number=trial.number,
            state=trial.state.name,
            architecture=dict(attrs.get("architecture", {})),
            weight_bits=dict(attrs.get("weight_bits", {})),
            act_bits=dict(attrs.get("act_bits", {})),
            size_kib=attrs.get("size_kib"),
            mbops=attrs.get("mbops"),
            accuracy=attrs.get("accuracy") if trial.state == TrialState.COMPLETE else None,
            feasible=all(v <= 0 for v in trial.constraints.values()),
            origin=origin,
            error=attrs.get("error") or attrs.get("skipped"),
            spec=spec,
        )

    def cost(self, objective: str) -> float | None:
        """The trial's value of the cost objective (``"size"``: KiB, ``"bops"``: millions)."""
        return self.size_kib if objective == "size" else self.mbops

    def bits_label(self, layers: Sequence[str] | None = None) -> str:
        """Weight bits in layer order, e.g. ``8-4-3-3-8`` (activation bits after a slash where they vary)."""
        names = list(layers) if layers is not None else list(self.weight_bits)
        weights = "-".join(str(self.weight_bits[n]) if n in self.weight_bits else "." for n in names)
        acts = {self.act_bits.get(n) for n in names if n in self.act_bits}
        if len(acts) > 1:
            weights += " / a " + "-".join(str(self.act_bits.get(n, ".")) for n in names)
        return weights


@dataclass(frozen=True)
class SearchResult:
    """Every trial of a study and its Pareto front (feasible trials only, by Optuna's constrained dominance).

    Attributes:
        trials: one record per trial, in trial order.
        front: the Pareto-optimal complete trials, by increasing cost.
        objective: ``"size"`` or ``"bops"``, the cost objective.
        budgets: the budgets in force (``max_size_kib``, ``max_mbops``), ``None`` where unset.
        layers: every quantized layer name over all architectures, in model order (the bits columns).
        seconds: wall time of the search call that produced the result (0 when only read back).
    """

    trials: tuple[TrialRecord, ...]
    front: tuple[TrialRecord, ...]
    objective: str
    budgets: dict[str, float | None]
    layers: tuple[str, ...]
    seconds: float = 0.0

    @classmethod
    def from_study(
        cls, study: optuna.Study, objective: str, budgets: dict[str, float | None], layers: Sequence[str]
    ) -> SearchResult:
        trials = tuple(TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False))
        by_number = {r.number: r for r in trials}
        front = sorted((by_number[t.number] for t in study.best_trials), key=lambda r: (r.cost(objective), r.number))
        return cls(trials, tuple(front), objective, dict(budgets), tuple(layers))

    @property
    def complete(self) -> tuple[TrialRecord, ...]:
        """The trials that trained and scored."""
        return tuple(r for r in self.trials if r.state == "COMPLETE")

    @property
    def cost_label(self) -> str:
        return "size (KiB)" if self.objective == "size" else "MBOPs"

    def hypervolume(self, reference: tuple[float, float], trials: Sequence[TrialRecord] | None = None) -> float:
        """:func:`hypervolume_2d` of the complete feasible trials (or of ``trials``) in (accuracy, cost)."""
        chosen = [r for r in (self.complete if trials is None else trials) if r.feasible and r.accuracy is not None]
        return hypervolume_2d(
            [r.accuracy for r in chosen],
            [r.cost(self.objective) for r in chosen],
            reference,  # type: ignore[misc]
        )

    def table(self) -> str:
        """The Pareto front as a markdown table: trial, architecture, bits per layer, size, BOPs, accuracy."""
        header = "| trial | origin | architecture | weight bits (layer order) | size (KiB) | MBOPs | accuracy |"
        lines = [header, "|---:|---|---|---|---:|---:|---:|"]
        for r in self.front:
            arch = ", ".join(f"{k}={v}" for k, v in r.architecture.items()) or "-"
            mbops = "-" if r.mbops is None else f"{r.mbops:.2f}"
            lines.append(
                f"| {r.number} | {r.origin} | {arch} | {r.bits_label(self._layers_of(r))} | {r.size_kib:.2f} | "
                f"{mbops} | {100 * (r.accuracy or 0.0):.2f} % |"
            )
        return "\n".join(lines)

    def _layers_of(self, record: TrialRecord) -> list[str]:
        return [n for n in self.layers if n in record.weight_bits]

    def csv(self) -> str:
        """The Pareto front as CSV, one column per layer's weight bits."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["trial", "origin", "architecture", "size_kib", "mbops", "accuracy", *self.layers])
        for r in self.front:
            arch = ";".join(f"{k}={v}" for k, v in r.architecture.items())
            writer.writerow(
                [
                    r.number,
                    r.origin,
                    arch,
                    r.size_kib,
                    r.mbops,
                    r.accuracy,
                    *(r.weight_bits.get(n, "") for n in self.layers),
                ]
            )
        return out.getvalue()

    def plot(self, path: str | Path) -> Path:
        """Accuracy against cost: every complete trial, the front as a step line, warm starts marked, budget."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        done = self.complete
        sampled = [r for r in done if not r.origin.startswith(("uniform", "spec"))]
        ax.scatter([r.cost(self.objective) for r in sampled], [100 * r.accuracy for r in sampled], s=18,
                   color="0.6", label="trials")  # fmt: skip
        warm = [r for r in done if r.origin.startswith(("uniform", "spec"))]
        if warm:
            ax.scatter([r.cost(self.objective) for r in warm], [100 * r.accuracy for r in warm], marker="s", s=30,
                       facecolors="none", edgecolors="tab:blue", label="warm starts")  # fmt: skip
            for r in warm:
                ax.annotate(r.origin.replace(" ", "\n", 1), (r.cost(self.objective), 100 * r.accuracy), fontsize=6,
                            xytext=(3, -8), textcoords="offset points")  # fmt: skip
        if self.front:
            xs = [r.cost(self.objective) for r in self.front]
            ys = [100 * r.accuracy for r in self.front]
            ax.step(xs, ys, where="post", color="tab:red", lw=1.2)
            ax.scatter(xs, ys, color="tab:red", s=26, zorder=3, label="Pareto front")
        budget = self.budgets.get("max_size_kib" if self.objective == "size" else "max_mbops")
        if budget is not None:
            ax.axvline(budget, color="k", ls="--", lw=0.8, label="budget")
        ax.set_xlabel(self.cost_label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``pareto_front.md``, ``pareto_front.csv``, ``pareto_front.png`` and ``specs/trial_<n>.yaml``.

        Each spec file is the trial's :class:`QuantSpec` (load it with ``QuantSpec.load``), headed by a comment that
        names the architecture the spec belongs to, its size and its accuracy.
        """
        directory = Path(directory)
        specs = directory / "specs"
        specs.mkdir(parents=True, exist_ok=True)
        paths = {"table": directory / "pareto_front.md", "csv": directory / "pareto_front.csv"}
        paths["table"].write_text(self.table() + "\n")
        paths["csv"].write_text(self.csv())
        paths["plot"] = self.plot(directory / "pareto_front.png")
        for r in self.front:
            if r.spec is None:
                continue
            spec_path = specs / f"trial_{r.number}.yaml"
            head = (
                f"# trial {r.number} ({r.origin}): architecture {r.architecture or '(fixed)'}, "
                f"size {r.size_kib:.2f} KiB, validation accuracy {100 * (r.accuracy or 0):.2f} %\n"
                "# use: QuantizationAwareTraining(spec=QuantSpec.load(this file)) on a model of that architecture\n"
            )
            spec_path.write_text(head + r.spec.to_yaml())
            paths[f"spec_{r.number}"] = spec_path
        return paths
