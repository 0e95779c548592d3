"""Search drivers above the callbacks: they run Trainers with the suite's callbacks (callbacks never import them).

* :class:`MixedPrecisionSearch` (BOMP-NAS): Bayesian optimisation over per-layer bit widths and architecture
  choices, with quantization-aware fine-tuning in the loop, on an Optuna study (SQLite by default, any Optuna
  storage for several workers); ``lightning-quant search`` on the command line.
* :mod:`lightning_quant.search.autoqb` (AutoQB): the command-line driver of
  :class:`~lightning_quant.callbacks.AutoQBCallback` (float training, the reinforcement-learning search of per-channel
  widths, QAT, packing); ``lightning-quant search --method autoqb``.
"""

from lightning_quant.search.bomp import Architecture, FeasibleSampler, MixedPrecisionSearch, SearchSpace
from lightning_quant.search.factory import ImageClassifierFactory, ModelFactory
from lightning_quant.search.results import SearchResult, TrialRecord, hypervolume_2d, pareto_mask

__all__ = [
    "Architecture",
    "FeasibleSampler",
    "ImageClassifierFactory",
    "MixedPrecisionSearch",
    "ModelFactory",
    "SearchResult",
    "SearchSpace",
    "TrialRecord",
    "hypervolume_2d",
    "pareto_mask",
]
