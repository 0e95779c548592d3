"""Block replacement (BR): QAT guided by a frozen full-precision copy through mixed LP-prefix / FP-suffix models."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.callbacks.base import FrozenCopy, QuantizationCallback, distillation_loss
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.validation import check_real
from lightning_quant.surgery.blocks import find_blocks
from lightning_quant.surgery.capture import Call, Capture
from lightning_quant.surgery.quantize import is_quantized, quantizable_layers
from lightning_quant.surgery.requests import QuantizationRequest, fallback_request
from lightning_quant.surgery.spec import QuantSpec

log = logging.getLogger(__name__)

_NAMING_HINT = (
    "HINT: name blocks at boundaries that every path of the forward crosses exactly once, in forward order: the "
    'stages of a ResNet (`backbone.layer1`, ..., or `blocks="auto"`), the entries of a `features` Sequential, or '
    "the top-level children of a plain sequence of layers."
)
_FORWARD_HINT = (
    "The LightningModule itself was not called, so training_step probably calls `self.forward(x)`: block replacement "
    "captures the blocks' inputs and outputs with module hooks, and PyTorch runs a module's hooks only when the "
    "module is called (`self(x)`, i.e. `nn.Module.__call__`), never on `self.forward(x)`. HINT: write "
    "`logits = self(x)` in training_step (the same computation, with the hooks)."
)


class _Replay(nn.Module):
    """Stands in for a module of the FP copy during a mixed forward: returns a given value, computes nothing."""

    def __init__(self, value: Any, clone: bool = False) -> None:
        super().__init__()
        self.value = value
        self.clone = clone
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.value.clone() if self.clone and isinstance(self.value, Tensor) else self.value


def _kd(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean, in float32."""
    return distillation_loss(student, teacher, temperature)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _versions(value: Any) -> list[int]:
    return [t._version for t in _tensors(value)]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["", "a", "a.b"]`` (outermost first; ``""`` is the LightningModule)."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts))]


class BlockReplacementCallback(QuantizationCallback):
    """Block replacement: the quantized (LP) blocks are also trained inside the frozen full-precision (FP) model.

    Paper: C. Yu, S. Yang, F. Zhang, H. Ma, A. Wang, E.-P. Li, "Improving Quantization-aware Training of
    Low-Precision Network via Block Replacement on Full-Precision Counterpart", arXiv:2412.15846, 2024.

    The model is split into blocks ``1..n`` (:func:`~lightning_quant.surgery.find_blocks`). Beside the quantized
    model ``Q = Q_1..Q_n`` (the one being trained) the callback keeps a frozen FP copy ``F = F_1..F_n`` and, each
    training step, forms the mixed models ``M_i = Q_1..Q_i -> F_{i+1}..F_n`` (``i = 1..n-1``): the LP features
    of block ``i`` go through the remaining FP blocks and head. The extra loss (added to the user's loss by the
    suite's one-backward mechanism, :class:`~lightning_quant.callbacks.QuantizationCallback`) is::

        lp_kd_weight * KD(F -> Q) + c * sum_{i in S} w_i * (KD(F -> M_i) + mixed_ce_weight * CE(M_i, y))

    with ``KD(t -> s) = T**2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean), ``S`` all ``n-1`` mixed models,
    or ``num_sampled`` of them drawn per step (then ``c = (n-1) / num_sampled`` keeps the expectation). Each
    ``Q_i`` thus learns to produce features that the FP suffix understands (forward), and receives gradients
    through the FP suffix, where there is no straight-through estimate (backward).

    What the paper says and what this callback does. The stored copies of the paper that we could read stop
    after its abstract and introduction (the equations of the method section were not readable), so the exact
    formulation below is this suite's choice; from the abstract and reviews of the paper: the FP partner is
    pre-trained and fixed; intermediate mixed-precision models are built by block-by-block replacement on the FP
    model and trained together with the LP backbone; the objective combines the task loss with distillation
    losses from the FP model; it wraps any QAT method. Our choices:

    * **Which mixed models**: ``M_1..M_{n-1}`` with an LP prefix (LP blocks feed FP blocks), as described in the
      issue and the abstract ("integration of quantized low-precision blocks into full-precision networks").
    * **Loss**: the user's task loss (untouched) + softened KL from F's logits to Q's and to each ``M_i``'s, with
      the classic ``T**2`` scaling (Hinton et al.); default ``T = 1``. Weights ``w_i = 2**-(n-i)`` by default
      (the mixed model closest to Q weighs most; Q itself is ``i = n`` with ``lp_kd_weight = 1 = 2**0``); CE of
      the mixed models on the batch labels is optional (``mixed_ce_weight``, default 0). If the batch has no
      integer labels (``(x, y)`` tuple), CE is skipped with a warning.
    * **F** is frozen: eval mode (BatchNorm uses its running statistics), ``requires_grad=False``, not a submodule
      of the LightningModule (not in the optimizer, not in its ``state_dict``); it follows the module's device and
      dtype at ``on_fit_start`` and, under DDP, rank 0's copy is broadcast.

    How F is built (in ``setup``, stage ``fit``): a deep copy of the LightningModule *before* quantization. When
    the model is already quantized (the suite quantizes once, in the first ``setup`` of any of its callbacks), F is
    ``dequantize_model(deepcopy(model))``: quantization keeps the float weights, so before training both orders
    (``[BR, QAT]`` or ``[QAT, BR]``) give the same F. (Only a model that was already trained with quantizers,
    e.g. a second ``fit``, gives a different F: its latent float weights.) Alone, BR asks for ``quantize_spec``
    (default :class:`QuantSpec`: W8A8); beside ``QuantizationAwareTraining`` QAT's recipe is used.

    Resume: F's weights are not those of the model in a checkpoint (the model has been trained since), so F's
    ``state_dict`` is saved in this callback's state (a second copy of the weights in each checkpoint) and loaded
    back on resume; the sampler's RNG state too, so a killed run resumes exactly.

    How the mixed forwards are run, for any model (no monkey-patching of the user's model):

    * The user's ``training_step`` already ran Q's forward: forward hooks on Q's blocks keep each block's output
      (with its graph) and a hook on the *root* -- the outermost module containing all blocks that the step
      calls (the LightningModule for ``self(x)``, else e.g. ``backbone``) -- keeps its inputs and logits. No
      second LP forward: the mixed models reuse the LP prefix activations.
    * F's logits: one forward of F's root under ``no_grad``.
    * ``M_i``: F's root forward in which blocks ``1..i`` of F are temporarily replaced (in F, our private copy) by
      modules returning Q's block outputs, so F's prefix blocks do not run at all and any later use of an earlier
      block's output sees the LP value; the modules that run before block 1 (a stem) are replayed from the F
      forward's cache once the first step has verified this gives identical results. What remains is the FP
      suffix, which builds the graph back to ``Q_1..Q_i``. Run under the Trainer's precision context (autocast).
    * First step: the hooks' call order is checked -- every block and the root called exactly once, blocks in the
      given order (``"auto"`` adopts the forward's order) -- and, for each boundary, that F's output depends on
      the input only through the blocks (a skip connection around a boundary makes the cut impossible).
      Violations raise :class:`QuantizationConfigError` before the first optimizer step.

    Cost (``benchmarks/block_replacement.py``, CPU): one FP forward without graph + ``n-1`` partial FP forwards
    with graph and their backward; a training step takes ~1.5-1.8x that of plain QAT (ResNet-8 / LeNet-5 on 16x16
    digits). Non-block modules between replayed blocks (e.g. a ReLU after a block that is itself one layer) still
    run; replaying F's prefix instead of running F's whole forward with a hook that swaps block i's output saves
    21 % of the callback's forward time on ResNet-8 and 44 % on torchvision ResNet-18 (32x32). The first step
    additionally runs the checks (about ``3n`` forwards of F, once). ``num_sampled=k`` bounds the mixed models to
    ``k`` per step.

    Logged: ``quant/br/kd_lp`` (KD F -> Q), ``quant/br/kd_mixed`` (mean KD F -> M_i over this step's mixed
    models), ``quant/br/ce_mixed`` (when ``mixed_ce_weight > 0``), ``quant/br/loss`` (the added term),
    ``quant/br/num_mixed``, ``quant/br/overhead`` (fraction of the step's wall time spent in the callback's
    forwards, measured with ``perf_counter`` without device synchronisation; the extra backward is not included).

    Args:
        blocks: ``"auto"`` or the qualified module names of the blocks (of the LightningModule), in forward order.
        temperature: distillation temperature ``T > 0``.
        weights: ``w_1..w_{n-1}`` of the mixed models (``None``: ``2**-(n-i)``).
        lp_kd_weight: weight of the KD term from F to the quantized model.
        mixed_ce_weight: weight of the mixed models' cross-entropy on the batch labels (relative to their KD).
        num_sampled: mixed models evaluated per step, drawn uniformly without replacement (``None``: all).
        seed: seed of that draw (the same on every rank).
        quantize_spec: recipe used to quantize the model when no other quantization callback does.

    Example:
        >>> trainer = L.Trainer(callbacks=[  # doctest: +SKIP
        ...     QuantizationAwareTraining(weight_bits=4, act_bits=4),
        ...     BlockReplacementCallback(blocks="auto"),
        ... ])
        >>> trainer.fit(model_with_fp_weights, datamodule)  # doctest: +SKIP
    """

    TECHNIQUE = "br"
    BLOCKS_AUTO: ClassVar[str] = "auto"

    def __init__(
        self,
        blocks: Literal["auto"] | list[str] = "auto",
        temperature: float = 1.0,
        weights: list[float] | None = None,
        lp_kd_weight: float = 1.0,
        mixed_ce_weight: float = 0.0,
        num_sampled: int | None = None,
        seed: int = 0,
        quantize_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        if isinstance(blocks, str):
            if blocks != self.BLOCKS_AUTO:
                raise QuantizationConfigError(
                    f'`blocks` must be "auto" or a list of module names, got {blocks!r}. '
                    f'HINT: blocks=["{blocks}", ...] names the blocks.'
                )
        elif not isinstance(blocks, Sequence) or not all(isinstance(b, str) for b in blocks) or len(blocks) < 2:
            raise QuantizationConfigError(
                f'`blocks` must be "auto" or a list of at least two module names, got {blocks!r}.'
            )
        check_real("temperature", temperature, minimum=0, minimum_inclusive=False, fix="pass e.g. `temperature=1.0`.")
        check_real("lp_kd_weight", lp_kd_weight, minimum=0, fix="pass e.g. `lp_kd_weight=1.0`; 0 drops the term.")
        check_real("mixed_ce_weight", mixed_ce_weight, minimum=0, fix="pass e.g. `mixed_ce_weight=0.0`.")
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise QuantizationConfigError(f"`weights` must be a list of numbers or None, got {weights!r}.")
            for w in weights:
                check_real("weights", w, minimum=0, fix="one weight >= 0 per mixed model, e.g. `weights=[1.0, 1.0]`.")
        if num_sampled is not None and (
            isinstance(num_sampled, bool) or not isinstance(num_sampled, int) or num_sampled < 1
        ):
            raise QuantizationConfigError(f"`num_sampled` must be a positive integer or None, got {num_sampled!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise QuantizationConfigError(f"`seed` must be an integer, got {seed!r}.")
        if quantize_spec is not None and not isinstance(quantize_spec, QuantSpec):
            raise QuantizationConfigError(f"`quantize_spec` must be a QuantSpec, got {type(quantize_spec).__name__}.")
        self.blocks: str | tuple[str, ...] = blocks if isinstance(blocks, str) else tuple(blocks)
        self.temperature = float(temperature)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.lp_kd_weight = float(lp_kd_weight)
        self.mixed_ce_weight = float(mixed_ce_weight)
        self.num_sampled = num_sampled
        self.seed = seed
        self.quantize_spec = quantize_spec if quantize_spec is not None else QuantSpec()
        self._quantize_spec_given = quantize_spec is not None
        # resolved in setup / on the first step
        self._block_names: list[str] = []
        self._fp_copy = FrozenCopy()
        self._root: str | None = None
        self._stem: list[str] = []
        self._checked = False
        self._clone_replays = False
        self._rng: torch.Generator | None = None
        self._rng_state: Tensor | None = None
        # per step
        self._handles: list[Any] = []
        self._armed = False
        self._events: list[tuple[str, str]] = []
        self._outputs: dict[str, Any] = {}
        self._inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._capture_versions: dict[str, list[int]] = {}
        self._stem_cache: dict[str, Any] = {}
        self._step_start = 0.0
        self._extra_seconds = 0.0
        self._warned_no_labels = False
        # a private switch for the benchmark: False runs F's whole prefix with a hook replacing block i's output
        self._skip_prefix = True

    # -- identity and state ----------------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "temperature": self.temperature, "num_sampled": self.num_sampled}

    @override
    def state(self) -> dict[str, Any]:
        return {
            "fp_state_dict": self._fp_copy.state_dict(),
            "rng_state": self._generator().get_state(),
            "block_names": list(self._block_names),
        }

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._rng_state = state["rng_state"].clone()
        self._rng = None
        self._block_names = list(state.get("block_names") or self._block_names)
        self._fp_copy.load_state_dict(state["fp_state_dict"])

    @property
    def fp_model(self) -> nn.Module | None:
        """The frozen full-precision copy (of the whole LightningModule), or ``None`` before ``setup``."""
        return self._fp_copy.module

    @property
    def _fp(self) -> nn.Module | None:
        return self._fp_copy.module

    @property
    def block_names(self) -> list[str]:
        """The blocks' qualified names, in forward order (after the first training step for ``"auto"``)."""
        return list(self._block_names)

    @property
    def root_name(self) -> str | None:
        """The module whose output is taken as the logits (``""``: the LightningModule), known after one step."""
        return self._root

    def mixed_weights(self) -> list[float]:
        """``w_1..w_{n-1}`` as used (defaults resolved)."""
        n = len(self._block_names)
        if self.weights is not None:
            return list(self.weights)
        return [2.0 ** -(n - i) for i in range(1, n)]

    def _generator(self) -> torch.Generator:
        if self._rng is None:
            self._rng = torch.Generator()
            self._rng.manual_seed(self.seed)
            if self._rng_state is not None:
                self._rng.set_state(self._rng_state)
        return self._rng

    # -- set-up ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_optimization(pl_module)  # before any work on the model
        if not quantizable_layers(pl_module) and not is_quantized(pl_module):
            raise QuantizationConfigError(
                f"`model` ({type(pl_module).__name__}) has no layer that can be quantized (Conv/Linear), so "
                "BlockReplacementCallback has no low-precision blocks to train."
            )
        names = [name for name, _ in find_blocks(pl_module, self.blocks)]
        for a in names:
            for b in names:
                if a != b and b.startswith(a + "."):
                    raise QuantizationConfigError(
                        f"`blocks` {a!r} contains {b!r}: blocks must not contain one another. {_NAMING_HINT}"
                    )
        n = len(names)
        if self.weights is not None and len(self.weights) != n - 1:
            raise QuantizationConfigError(
                f"`weights` must give one weight per mixed model, n - 1 = {n - 1} for the {n} blocks {names}, "
                f"got {len(self.weights)}."
            )
        if self.num_sampled is not None and self.num_sampled > n - 1:
            raise QuantizationConfigError(
                f"`num_sampled` must be at most n - 1 = {n - 1} (the number of mixed models of the {n} blocks "
                f"{names}), got {self.num_sampled}. HINT: num_sampled=None evaluates all of them."
            )
        if stage == "fit" and not self._fp_copy.built_for(pl_module):
            self._block_names = names
            self._copy_fp(trainer, pl_module)
            self._checked = False
        elif not self._block_names:
            self._block_names = names
        super().setup(trainer, pl_module, stage)

    def _copy_fp(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        was_quantized = is_quantized(pl_module)
        fp = self._fp_copy.build(pl_module)
        if was_quantized:
            rank_zero_info(
                "BlockReplacementCallback: the model was already quantized (by another callback's setup); the FP copy "
                "is its dequantized copy (same float weights)."
            )
        return fp

    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        # a fallback recipe: another callback's (QAT's) wins, except for what the user set in `quantize_spec`
        return fallback_request(type(self).__name__, self.quantize_spec, self._quantize_spec_given)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quantized(pl_module):
            raise QuantizationConfigError(
                "BlockReplacementCallback found no quantized layer (its `quantize_spec` selects none). HINT: check "
                "`quantize_spec`'s include/exclude, or add `QuantizationAwareTraining` to the callbacks."
            )
        self._fp_copy.place(trainer, pl_module)  # setup("fit") built it; restored weights, device, dtype
        self._install_hooks(pl_module)
        mode = f"{self.num_sampled} of {len(self._block_names) - 1}" if self.num_sampled else "all"
        rank_zero_info(
            f"Block replacement: {len(self._block_names)} blocks {self._block_names}; mixed models per step: {mode}."
        )

    def _install_hooks(self, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        watched = set(self._block_names)
        common = _ancestors(self._block_names[0] + ".x")
        for name in self._block_names[1:]:
            anc = _ancestors(name + ".x")
            common = [a for a, b in zip(common, anc, strict=False) if a == b]
        candidates = common if self._root is None else [self._root]
        modules = dict(pl_module.named_modules())
        for name in [*candidates, *self._block_names]:
            module = modules[name]
            self._handles.append(
                module.register_forward_pre_hook(self._pre_hook(name, name not in watched), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._post_hook(name)))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, name: str, keep_inputs: bool):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._armed:
                self._events.append(("pre", name))
                if keep_inputs and name not in self._inputs:
                    self._inputs[name] = (args, kwargs)
                    self._capture_versions["@" + name] = _versions((args, kwargs))

        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._armed:
                self._events.append(("post", name))
                if name not in self._outputs:
                    self._outputs[name] = output
                    self._capture_versions[name] = _versions(output)

        return hook

    # -- the step --------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._events, self._outputs, self._inputs, self._capture_versions = [], {}, {}, {}
        self._armed = True
        self._extra_seconds = 0.0
        self._step_start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed = False
        self._events, self._outputs, self._inputs, self._capture_versions = [], {}, {}, {}
        self._stem_cache = {}
        step = time.perf_counter() - self._step_start
        if step > 0 and self._extra_seconds > 0:
            self.log_metric(pl_module, "overhead", self._extra_seconds / step)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def extra_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        start = time.perf_counter()
        self._armed = False
        assert self._fp is not None
        precision = getattr(trainer, "precision_plugin", None)
        context = precision.forward_context() if precision is not None else nullcontext()
        with context:
            if not self._checked:
                self._first_step_checks(pl_module)
            self._check_step()
            root = self._root
            assert root is not None
            args, kwargs = self._inputs[root]
            fp_root = self._fp.get_submodule(root) if root else self._fp
            q_logits = self._logits(self._outputs[root], root)
            with torch.no_grad():
                fp_logits = self._logits(self._fp_forward(fp_root, args, kwargs, cache_stem=True), root)
            kd_lp = _kd(q_logits, fp_logits, self.temperature)
            total = self.lp_kd_weight * kd_lp
            n = len(self._block_names)
            selected = list(range(1, n))
            if self.num_sampled is not None and self.num_sampled < n - 1:
                order = torch.randperm(n - 1, generator=self._generator())[: self.num_sampled]
                selected = sorted(int(i) + 1 for i in order)
            factor = (n - 1) / len(selected)
            weights = self.mixed_weights()
            labels = self._labels(batch) if self.mixed_ce_weight > 0 else None
            kd_values, ce_values = [], []
            for i in selected:
                logits = self._logits(self._mixed_forward(fp_root, i, args, kwargs), root)
                kd = _kd(logits, fp_logits, self.temperature)
                term = kd
                kd_values.append(kd.detach())
                if labels is not None:
                    ce = F.cross_entropy(logits.float(), labels)
                    ce_values.append(ce.detach())
                    term = term + self.mixed_ce_weight * ce
                total = total + factor * weights[i - 1] * term
        self._outputs, self._inputs, self._stem_cache = {}, {}, {}
        self.log_metric(pl_module, "kd_lp", kd_lp.detach())
        self.log_metric(pl_module, "kd_mixed", torch.stack(kd_values).mean())
        if ce_values:
            self.log_metric(pl_module, "ce_mixed", torch.stack(ce_values).mean())
        self.log_metric(pl_module, "loss", total.detach())
        self.log_metric(pl_module, "num_mixed", float(len(selected)))
        self._extra_seconds += time.perf_counter() - start
        return total

    def _labels(self, batch: Any) -> Tensor | None:
        if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
            y = batch[1]
            if not y.is_floating_point() and not y.is_complex():
                return y
        if not self._warned_no_labels:
            rank_zero_warn(
                "BlockReplacementCallback: `mixed_ce_weight > 0` but the batch is not an `(x, y)` pair with integer "
                "labels; the mixed models' cross-entropy is skipped (their distillation loss still applies)."
            )
            self._warned_no_labels = True
        return None

    def _logits(self, output: Any, root: str) -> Tensor:
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 1:
            raise QuantizationConfigError(
                f"BlockReplacementCallback distils the output of {root or 'the LightningModule'!r}, "
                f"which must be a tensor of logits, got {type(output).__name__}. HINT: return the logits from the "
                "module's forward (or name blocks inside a module that does)."
            )
        return output

    # -- forwards of the FP copy -----------------------------------------------------------------------------
    @contextmanager
    def _swapped(self, replacements: dict[str, nn.Module]) -> Iterator[None]:
        assert self._fp is not None
        saved = []
        try:
            for name, new in replacements.items():
                parent_name, _, attr = name.rpartition(".")
                parent = self._fp.get_submodule(parent_name) if parent_name else self._fp
                saved.append((parent, attr, parent._modules[attr]))
                parent._modules[attr] = new
            yield
        finally:
            for parent, attr, old in reversed(saved):
                parent._modules[attr] = old

    def _fp_forward(self, fp_root: nn.Module, args: tuple, kwargs: dict, cache_stem: bool = False) -> Any:
        if not (cache_stem and self._stem):
            return fp_root(*args, **kwargs)
        assert self._fp is not None

        def keep(name: str, module: nn.Module, call: Call) -> None:
            self._stem_cache[name] = call.output

        with Capture(self._fp, self._stem, detach=False, on_call=keep):
            return fp_root(*args, **kwargs)

    def _mixed_forward(self, fp_root: nn.Module, i: int, args: tuple, kwargs: dict, use_stem: bool = True) -> Any:
        """M_i: Q's blocks 1..i, then F's forward from there on."""
        if not self._skip_prefix:
            return self._mixed_forward_hooked(fp_root, i, args, kwargs)
        replacements: dict[str, nn.Module] = {}
        if use_stem:
            replacements.update({name: _Replay(self._stem_cache[name]) for name in self._stem})
        for j in range(i):
            name = self._block_names[j]
            replacements[name] = _Replay(self._outputs[name], clone=self._clone_replays)
        with self._swapped(replacements):
            return fp_root(*args, **kwargs)

    def _mixed_forward_hooked(self, fp_root: nn.Module, i: int, args: tuple, kwargs: dict) -> Any:
        """The plain variant (benchmark only): F's whole forward, a hook replaces block i's output."""
        assert self._fp is not None
        value = self._outputs[self._block_names[i - 1]]
        module = self._fp.get_submodule(self._block_names[i - 1])
        handle = module.register_forward_hook(lambda m, a, out: value.clone() if self._clone_replays else value)
        try:
            return fp_root(*args, **kwargs)
        finally:
            handle.remove()

    # -- checks ----------------------------------------------------------------------------------------------
    def _counts(self) -> dict[str, tuple[int, int]]:
        counts: dict[str, list[int]] = {}
        for kind, name in self._events:
            c = counts.setdefault(name, [0, 0])
            c[0 if kind == "pre" else 1] += 1
        return {k: (v[0], v[1]) for k, v in counts.items()}

    def _check_block_calls(self, counts: dict[str, tuple[int, int]]) -> None:
        for name in self._block_names:
            calls = counts.get(name, (0, 0))[1]
            if calls != 1:
                what = "never called" if calls == 0 else f"called {calls} times"
                raise QuantizationConfigError(
                    f"Block {name!r} was {what} in the training step's forward; block replacement needs every block "
                    "called exactly once per step (blocks that cover the forward, and a training_step that calls "
                    f"the model once). {_NAMING_HINT}"
                )

    def _check_step(self) -> None:
        counts = self._counts()
        self._check_block_calls(counts)
        root = self._root
        if root is None or counts.get(root, (0, 0))[1] != 1 or root not in self._inputs:
            if root == "" and counts.get(root, (0, 0)) == (0, 0):
                raise QuantizationConfigError(
                    f"The blocks ran in this training step but their module did not. {_FORWARD_HINT}"
                )
            raise QuantizationConfigError(
                f"The module {root!r} that holds the blocks was not called exactly once in this training step. "
                "HINT: call the model once per training_step, e.g. `logits = self(x)`; before calling "
                "`self.quantization_loss(batch)` when using the mixin."
            )
        for key in [*self._block_names, "@" + root]:
            value = self._inputs[root] if key.startswith("@") else self._outputs[key]
            if _versions(value) != self._capture_versions[key]:
                where = f"The input of {root!r}" if key.startswith("@") else f"The output of block {key!r}"
                raise QuantizationConfigError(
                    f"{where} was modified in place after it was computed (e.g. `x += ...` or an `inplace=True` "
                    "activation right after the block), so it cannot be fed to the FP copy. HINT: make that "
                    f"operation out-of-place, or end the block after it. {_NAMING_HINT}"
                )

    def _first_step_checks(self, pl_module: pl.LightningModule) -> None:
        assert self._fp is not None
        counts = self._counts()
        self._check_block_calls(counts)
        # the root: the outermost module containing all blocks that the step called once with a tensor output
        roots = [
            name
            for name in sorted(self._inputs, key=len)  # the candidates are a chain of ancestors: outermost first
            if counts.get(name, (0, 0)) == (1, 1) and isinstance(self._outputs.get(name), Tensor)
        ]
        if not roots:
            if counts.get("", (0, 0)) == (0, 0) and not any(
                name in self._inputs for name in _ancestors(self._block_names[0])
            ):
                raise QuantizationConfigError(
                    f"No module that contains all blocks {self._block_names} was called in the training step, although "
                    f"the blocks were. {_FORWARD_HINT}"
                )
            raise QuantizationConfigError(
                f"No module that contains all blocks {self._block_names} was called exactly once with a tensor "
                "output in the training step. HINT: call the model once in training_step, e.g. `logits = self(x)`."
            )
        self._root = roots[0]
        self._check_order()
        # from now on only the root's inputs and outputs are kept
        self._install_hooks(pl_module)
        self._check_cut()
        self._checked = True
        log.debug("Block replacement: root %r, blocks %s, stem %s", self._root, self._block_names, self._stem)

    def _check_order(self) -> None:
        root = self._root
        pre = [name for kind, name in self._events if kind == "pre" and name in self._block_names]
        root_pre = next(k for k, e in enumerate(self._events) if e == ("pre", root))
        root_post = next(k for k, e in enumerate(self._events) if e == ("post", root))
        for k, (_, name) in enumerate(self._events):
            if name in self._block_names and not root_pre < k < root_post:
                raise QuantizationConfigError(
                    f"Block {name!r} was called outside the forward of {root!r}. {_NAMING_HINT}"
                )
        # a block must return before the next one starts
        calls = [e for e in self._events if e[1] in self._block_names]
        for k in range(0, len(calls), 2):
            (kind_a, a), (kind_b, b) = calls[k], calls[k + 1]
            if kind_a != "pre" or (kind_b, b) != ("post", a):
                raise QuantizationConfigError(
                    f"Blocks {a!r} and {b!r} overlap in the forward (one is called while the other runs). "
                    f"{_NAMING_HINT}"
                )
        if pre != self._block_names:
            if self.blocks == self.BLOCKS_AUTO:
                log.info("Block replacement: blocks reordered to the forward's order %s", pre)
                self._block_names = pre
            else:
                raise QuantizationConfigError(
                    f"`blocks` are out of order: the forward calls them as {pre}, `blocks` lists {self._block_names}. "
                    "HINT: list the blocks in the order the forward calls them."
                )

    def _check_cut(self) -> None:
        """For each boundary i, F's output must depend on the input only through blocks 1..i (no bypass)."""
        assert self._fp is not None and self._root is not None
        root = self._root
        fp_root = self._fp.get_submodule(root) if root else self._fp
        args, kwargs = self._inputs[root]
        # which modules of F run before block 1 (the stem), from one recorded forward of F
        events: list[tuple[str, str]] = []
        handles = []
        prefix = root + "." if root else ""
        for name, module in fp_root.named_modules():
            full = prefix + name if name else root
            handles.append(module.register_forward_pre_hook(lambda m, a, full=full: events.append(("pre", full))))
            handles.append(module.register_forward_hook(lambda m, a, o, full=full: events.append(("post", full))))
        try:
            with torch.no_grad():
                reference = fp_root(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self._stem = self._find_stem(events)
        # the cut: inputs that require grad, blocks 1..i replaced by constants -> the output must not require grad
        float_inputs = [t for t in _tensors((args, kwargs)) if t.is_floating_point()]
        if float_inputs:
            for i in range(1, len(self._block_names) + 1):
                g_args, g_kwargs = _with_grad((args, kwargs))
                replays = {
                    name: _Replay(
                        self._outputs[name].detach().clone()
                        if isinstance(self._outputs[name], Tensor)
                        else self._outputs[name]
                    )
                    for name in self._block_names[:i]
                }
                with torch.enable_grad(), self._swapped(dict(replays)):
                    out = fp_root(*g_args, **g_kwargs)
                if isinstance(out, Tensor) and out.requires_grad:
                    after = self._block_names[i - 1]
                    raise QuantizationConfigError(
                        f"The forward of {root or type(self._fp).__name__!r} cannot be cut after block {after!r}: its "
                        f"output depends on the input through a path that bypasses blocks {self._block_names[:i]} "
                        "(e.g. a skip connection around the boundary, or a block that the forward does not "
                        f"always go through). {_NAMING_HINT}"
                    )
                for replay in replays.values():
                    value = replay.value
                    if isinstance(value, Tensor) and value._version != 0:
                        self._clone_replays = True  # F's suffix changes its input in place: feed it copies
        else:
            log.debug("Block replacement: no floating-point input, the cut check is skipped")
        # replaying the stem from F's cache must give the same mixed outputs as running it
        if self._stem:
            self._stem_cache = {}
            with torch.no_grad():
                self._fp_forward(fp_root, args, kwargs, cache_stem=True)
                for i in range(1, len(self._block_names)):
                    a = self._mixed_forward(fp_root, i, args, kwargs, use_stem=False)
                    b = self._mixed_forward(fp_root, i, args, kwargs, use_stem=True)
                    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)):
                        log.debug("Block replacement: the stem %s is run, not replayed", self._stem)
                        self._stem = []
                        break
        del reference

    def _find_stem(self, events: list[tuple[str, str]]) -> list[str]:
        """Modules of F (not containing blocks) that are called once and return before block 1 is entered."""
        first = next((k for k, e in enumerate(events) if e == ("pre", self._block_names[0])), None)
        if first is None:
            return []
        on_path = {a for name in self._block_names for a in _ancestors(name)} | set(self._block_names)
        calls: dict[str, int] = {}
        for kind, name in events:
            if kind == "pre":
                calls[name] = calls.get(name, 0) + 1
        stem = []
        for kind, name in events[:first]:
            if kind != "post" or name in on_path or calls.get(name) != 1:
                continue
            if _parent(name) in on_path:
                stem.append(name)
        return stem

    # -- clean-up --------------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_hooks()
        self._armed = False
        self._outputs, self._inputs, self._stem_cache = {}, {}, {}


def _with_grad(value: Any) -> Any:
    """A copy of nested args in which floating-point tensors are fresh leaves that require grad."""
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_(True) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_with_grad(v) for v in value)
    if isinstance(value, list):
        return [_with_grad(v) for v in value]
    if isinstance(value, dict):
        return {k: _with_grad(v) for k, v in value.items()}
    return value
