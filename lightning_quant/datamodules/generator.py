"""ZS-CGAN: a conditional generator trained against a frozen classifier's BatchNorm statistics (data-free data).

* :class:`ConditionalGenerator`: latent ``z`` + class label ``y`` -> a sample of the teacher's input shape, with
  label-conditioned normalization.
* :class:`GeneratorTrainer`: the small ``LightningModule`` that trains it against a frozen teacher (run by a
  ``Trainer``, so the generator training has a progress bar, logged losses and any accelerator).
* :class:`GeneratorDataModule`: trains (or loads) the generator in ``setup`` and serves freshly generated
  labelled batches, a drop-in replacement for real data in ``trainer.fit(model, datamodule=...)``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.io import load_weights_only
from lightning_quant.core.validation import check_int
from lightning_quant.surgery.capture import Call, Capture

__all__ = ["ConditionalGenerator", "GeneratorDataModule", "GeneratorTrainer", "bn_layers", "distill_inputs"]

log = logging.getLogger(__name__)

_BN_HINT = (
    "ZS-CGAN trains the generator to reproduce the per-channel mean and variance stored in the teacher's "
    "BatchNorm layers (the only trace of the training data a data-free method has), so the teacher needs at "
    "least one. HINT: use a teacher with BatchNorm (e.g. `lightning_quant.models.resnet8`), or "
    "`source='noise'` (Gaussian inputs labelled by the teacher, the data-free floor)."
)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers of ``model`` that keep running statistics, as ``(qualified name, module)``."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _check_shape(name: str, shape: Any) -> tuple[int, int, int]:
    if (
        not isinstance(shape, Sequence)
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise QuantizationConfigError(
            f"`{name}` must be the (channels, height, width) of one input sample, got {shape!r}. "
            "HINT: (1, 28, 28) for MNIST, (3, 32, 32) for CIFAR-10."
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine part, followed by a per-class scale and shift (label-conditioned)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class ConditionalGenerator(nn.Module):
    """Conditional generator: ``G(z, y)`` maps a latent vector and a class label to one input sample.

    ``z * embed(y)`` -> linear -> ``(width, ceil(H/4), ceil(W/4))`` -> two (upsample x2, 3x3 conv,
    label-conditioned BatchNorm, LeakyReLU) stages -> 3x3 conv to ``C`` channels -> tanh -> BatchNorm without
    affine (the samples come out per-channel standardized, like normalized images) -> resized to ``(H, W)``
    when ``H`` or ``W`` is not a multiple of 4. The label acts twice: on the latent (embedding) and on every
    hidden normalization (a per-class scale and shift, :class:`ConditionalBatchNorm2d`).

    Args:
        latent_dim: size of ``z``.
        num_classes: number of labels.
        out_shape: ``(C, H, W)`` of one sample (the teacher's input).
        width: channels of the first feature map (the second stage has ``width // 2``).

    Example:
        >>> g = ConditionalGenerator(latent_dim=32, num_classes=10, out_shape=(1, 8, 8))
        >>> x, y = g.sample(4, torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 1, 8, 8), (4,))
    """

    def __init__(self, latent_dim: int, num_classes: int, out_shape: Sequence[int], width: int = 64) -> None:
        super().__init__()
        check_int("latent_dim", latent_dim, minimum=1, fix="pass e.g. `latent_dim=64`.")
        check_int("num_classes", num_classes, minimum=1, fix="pass the classes of the teacher, e.g. `num_classes=10`.")
        check_int("width", width, minimum=1, fix="pass e.g. `width=64`.")
        if num_classes < 2:
            raise QuantizationConfigError(f"`num_classes` must be at least 2, got {num_classes}.")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.out_shape = _check_shape("out_shape", out_shape)
        self.width = width
        c, h, w = self.out_shape
        self._h0, self._w0 = math.ceil(h / 4), math.ceil(w / 4)
        half = max(width // 2, 1)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, width * self._h0 * self._w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.cbn1 = ConditionalBatchNorm2d(width, num_classes)
        self.conv2 = nn.Conv2d(width, half, 3, padding=1)
        self.cbn2 = ConditionalBatchNorm2d(half, num_classes)
        self.conv_out = nn.Conv2d(half, c, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(c, affine=False)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (saved beside the weights)."""
        return {
            "latent_dim": self.latent_dim,
            "num_classes": self.num_classes,
            "out_shape": list(self.out_shape),
            "width": self.width,
        }

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(z * self.embed(y)).view(z.shape[0], self.width, self._h0, self._w0)
        h = self.bn0(h)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.cbn1(self.conv1(h), y), 0.2)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.cbn2(self.conv2(h), y), 0.2)
        x = self.bn_out(torch.tanh(self.conv_out(h)))
        _, height, width = self.out_shape
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        return x

    def sample_inputs(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(z, y)``: ``n`` standard-normal latents and uniformly drawn labels (on the generator's device)."""
        device = self.embed.weight.device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        y = torch.randint(self.num_classes, (n,), generator=generator).to(device)
        return z, y

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` labelled samples ``(x, y)`` in eval mode (BatchNorm running statistics), without a graph."""
        was_training = self.training
        self.eval()
        try:
            z, y = self.sample_inputs(n, generator)
            return self(z, y), y
        finally:
            self.train(was_training)

    def save(self, path: str | os.PathLike) -> None:
        """Save configuration and weights to ``path`` (read back with :meth:`load`)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"config": self.config(), "state_dict": state}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> ConditionalGenerator:
        """A generator saved with :meth:`save`."""
        saved = torch.load(path, map_location=map_location, weights_only=True)
        generator = cls(**saved["config"])
        generator.load_state_dict(saved["state_dict"])
        return generator


def _bn_stat_loss(mean: Tensor, var: Tensor, run_mean: Tensor, run_var: Tensor, kind: str, eps: float) -> Tensor:
    """Distance of a batch's per-channel statistics from a BatchNorm layer's running statistics (channel mean)."""
    if kind == "kl":
        # KL(N(mean, var) || N(run_mean, run_var)) per channel
        var, run_var = var + eps, run_var + eps
        kl = 0.5 * (torch.log(run_var / var) + (var + (mean - run_mean) ** 2) / run_var - 1.0)
        return kl.mean()
    return F.mse_loss(mean, run_mean) + F.mse_loss(var, run_var)


class _BNStatistics:
    """Hooks on every BN layer of a model (a :class:`~lightning_quant.surgery.capture.Capture` of their inputs,
    graph kept): the distance of each input's batch statistics from the layer's running statistics."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.kind = kind
        self.losses: list[Tensor] = []
        self._capture = Capture(
            model, dict(bn_layers(model)), outputs=False, inputs=True, detach=False, on_call=self._record
        )

    def _record(self, name: str, module: nn.Module, call: Call) -> None:
        x = call.input.float()
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        bn: Any = module
        self.losses.append(_bn_stat_loss(mean, var, bn.running_mean.float(), bn.running_var.float(), self.kind, bn.eps))

    def pop(self) -> Tensor:
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        self.losses = []
        return total

    def remove(self) -> None:
        self._capture.remove()


def distill_inputs(
    teacher: nn.Module,
    num_samples: int,
    input_shape: Sequence[int],
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 0.1,
    bn_loss: str = "l2",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """ZeroQ-style distilled data: inputs optimised directly to match the teacher's BatchNorm statistics.

    Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework" (CVPR 2020): start from Gaussian noise and
    minimise, by gradient descent on the inputs themselves (no generator, no labels), the distance of every BN
    layer's batch statistics to its running statistics. The pool is optimised in batches of ``batch_size``,
    ``steps`` Adam steps in all, shared evenly between the batches; labels are the teacher's predictions.

    Returns:
        ``(x, y)``: ``num_samples`` inputs of ``input_shape`` and their teacher labels, on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(iter([*teacher.parameters(), *teacher.buffers()]), torch.zeros(())).device
    chunks = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    steps_per_chunk = max(1, steps // len(chunks))
    stats = _BNStatistics(teacher, bn_loss)
    xs, ys = [], []
    try:
        for size in chunks:
            x = torch.randn(size, *input_shape, generator=generator).to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            for _ in range(steps_per_chunk):
                optimizer.zero_grad()
                teacher(x)
                stats.pop().backward()
                optimizer.step()
            with torch.no_grad():
                ys.append(teacher(x).argmax(dim=1).cpu())
                stats.pop()
            xs.append(x.detach().cpu())
    finally:
        stats.remove()
    return torch.cat(xs), torch.cat(ys)


def mode_seeking_loss(x: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode-seeking diversity loss (Mao et al., "Mode Seeking GANs", CVPR 2019) of a batch paired by halves.

    Sample ``i`` of the first half and sample ``i`` of the second half share a label and differ in their latent;
    the loss is ``1 / (mean|x1 - x2| / mean|z1 - z2| + eps)``: small when different latents give different
    samples, large when the generator maps a whole class to one sample (intra-class mode collapse).
    """
    half = x.shape[0] // 2
    dx = (x[:half] - x[half : 2 * half]).abs().mean()
    dz = (z[:half] - z[half : 2 * half]).abs().mean()
    return 1.0 / (dx / dz + eps)


class _StepIndices(IterableDataset):
    """``0..steps-1``: the generator trainer's 'data' (its samples come from its own seeded latent draws)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[Tensor]:
        return iter(torch.arange(self.steps))


class GeneratorTrainer(L.LightningModule):
    """Trains a :class:`ConditionalGenerator` against a frozen teacher (ZS-CGAN's zero-shot generator learning).

    Loss per step, on a batch of ``z ~ N(0, I)`` and uniform labels ``y``::

        CE(teacher(G(z, y)), y) + bn_weight * sum_l D(batch statistics of BN layer l's input || its running stats)
            + diversity_weight * mode_seeking_loss(G(z, y), z)

    with ``D`` the per-channel Gaussian KL divergence (``bn_loss="kl"``) or the squared distance of means and of
    variances (``"l2"``, GDFQ/ZeroQ-style), averaged over channels and summed over the teacher's BN layers. The
    teacher stays in eval mode (its BN layers normalise with their running statistics; the hooks measure the
    generated batch's own statistics) and receives no gradient.

    Why a diversity term: CE and the BN statistics of a mixed-class batch say nothing about the variety *within*
    a class. Without it we measured a generator map nearly every latent of one MNIST class to one image (pairwise
    distance of its samples 4.2 against 18.3 for real "1"s); a W4A4 student trained on it lost that class on real
    data (71.5 % test accuracy although the teacher labelled 99.9 % of the samples as conditioned; a second seed:
    69.3 %, with "1" and "7" lost). With ``diversity_weight > 0`` the batch is drawn in two halves with the same
    labels and different latents, and :func:`mode_seeking_loss` penalises pairs that come out alike. The same two
    seeds at W4A4 / W8A8: weight 0.1 gives 96.8, 95.7 / 96.7, 96.8 %; 0.3 gives 95.9, 95.5 / 96.7, 96.5 %; 1 gives
    95.4, 95.7 / -, 95.7 %. The default, 0.3, keeps a margin from the collapse (the "1"s' spread is 9-10 at 0.3,
    5.8 at 0.1). The paper's text we could read names no such term: it is our addition, and
    ``diversity_weight=0`` gives the loss without it.

    Logged (per step, in the progress bar): ``quant/zscgan/loss``, ``quant/zscgan/ce``, ``quant/zscgan/bn``,
    ``quant/zscgan/diversity`` (the mode-seeking loss, when weighted), ``quant/zscgan/teacher_acc`` (the teacher's
    accuracy on the generated labels). :attr:`history` keeps them.

    Args:
        generator: the generator to train.
        teacher: the frozen classifier (with BatchNorm).
        batch_size: samples per generator step.
        lr: Adam learning rate (betas 0.5, 0.999).
        bn_weight: weight ``lambda`` of the BN-statistics term.
        bn_loss: ``"kl"`` or ``"l2"``.
        diversity_weight: weight of the mode-seeking diversity term (``0``: none; see above).
        seed: seed of the latent and label draws.
    """

    def __init__(
        self,
        generator: ConditionalGenerator,
        teacher: nn.Module,
        batch_size: int = 64,
        lr: float = 1e-3,
        bn_weight: float = 1.0,
        bn_loss: Literal["kl", "l2"] = "kl",
        diversity_weight: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not bn_layers(teacher):
            raise QuantizationConfigError(f"`teacher` ({type(teacher).__name__}) has no BatchNorm layer. {_BN_HINT}")
        self.generator = generator
        self.teacher = teacher
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.batch_size = batch_size
        self.lr = lr
        self.bn_weight = bn_weight
        self.bn_loss = bn_loss
        self.diversity_weight = diversity_weight
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self._stats: _BNStatistics | None = None
        self._rng = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True) -> GeneratorTrainer:
        """Switch the generator's mode; the teacher always stays in eval mode (BN uses its running statistics)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def on_train_start(self) -> None:
        self._stats = _BNStatistics(self.teacher, self.bn_loss)

    def on_train_end(self) -> None:
        if self._stats is not None:
            self._stats.remove()
            self._stats = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        assert self._stats is not None  # set in on_train_start
        self.teacher.eval()  # Lightning puts the whole module in train mode; the teacher must stay in eval
        z, y = self.generator.sample_inputs(self.batch_size, self._rng)
        if self.diversity_weight > 0:
            half = self.batch_size // 2
            y = torch.cat([y[:half], y[:half], y[2 * half :]])  # pairs (i, half + i) share a label
        x = self.generator(z, y)
        self._stats.pop()
        logits = self.teacher(x)
        bn = self._stats.pop()
        ce = F.cross_entropy(logits.float(), y)
        loss = ce + self.bn_weight * bn
        values = {"loss": loss, "ce": ce, "bn": bn}
        if self.diversity_weight > 0:
            values["diversity"] = mode_seeking_loss(x.float(), z.float())
            loss = loss + self.diversity_weight * values["diversity"]
            values["loss"] = loss
        values["teacher_acc"] = (logits.argmax(dim=1) == y).float().mean()
        for name, value in values.items():
            self.log(f"quant/zscgan/{name}", value, prog_bar=name != "ce", on_step=True)
        self.history.append({k: float(v.detach()) for k, v in values.items()})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.5, 0.999))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_StepIndices(self.trainer.max_steps), batch_size=None)


def train_generator(
    generator: ConditionalGenerator,
    teacher: nn.Module,
    steps: int,
    trainer_kwargs: dict[str, Any] | None = None,
    **trainer_module_kwargs: Any,
) -> GeneratorTrainer:
    """Train ``generator`` against ``teacher`` for ``steps`` steps with a :class:`GeneratorTrainer` and a Trainer.

    ``trainer_kwargs`` go to ``L.Trainer`` (default: CPU, one device, progress bar, no logger or checkpoints);
    the other keyword arguments to :class:`GeneratorTrainer`. Returns the module (``history`` holds the losses).
    """
    module = GeneratorTrainer(generator, teacher, **trainer_module_kwargs)
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
    )
    kwargs.update(trainer_kwargs or {})
    kwargs.update(max_steps=steps, max_epochs=-1, num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # the teacher is in eval mode on purpose (its BN layers normalise with their running statistics)
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        L.Trainer(**kwargs).fit(module)
    generator.eval()
    seconds = time.perf_counter() - start
    last = module.history[-1] if module.history else {}
    rank_zero_info(
        f"ZS-CGAN generator: {steps} steps in {seconds:.1f} s; last loss {last.get('loss', float('nan')):.4f}, "
        f"BN {last.get('bn', float('nan')):.4f}, teacher accuracy on generated labels "
        f"{last.get('teacher_acc', float('nan')):.3f}"
    )
    module.seconds = seconds  # type: ignore[attr-defined]
    return module


def _stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, epoch, batch): distinct streams, deterministic."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class _GeneratedBatches(IterableDataset):
    """Labelled batches from a source, a fresh seeded stream per (rank, epoch), or a fixed pool."""

    def __init__(self, dm: GeneratorDataModule, num_samples: int, stream: int, fixed: bool) -> None:
        self.dm = dm
        self.num_samples = num_samples
        self.stream = stream
        self.fixed = fixed
        self._pool: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.dm.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        dm, bs, rank = self.dm, self.dm.batch_size, self.dm.rank
        if self.fixed:
            if self._pool is None:
                g = torch.Generator().manual_seed(_stream_seed(dm.seed, self.stream, rank))
                parts = [dm.generate(min(bs, self.num_samples - i), g) for i in range(0, self.num_samples, bs)]
                self._pool = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            x, y = self._pool
            for i in range(0, self.num_samples, bs):
                yield x[i : i + bs], y[i : i + bs]
            return
        epoch = dm.current_epoch()
        for b, i in enumerate(range(0, self.num_samples, bs)):
            g = torch.Generator().manual_seed(_stream_seed(dm.seed, self.stream, rank, epoch, b))
            yield dm.generate(min(bs, self.num_samples - i), g)


class GeneratorDataModule(L.LightningDataModule):
    """Data-free data: labelled samples from a conditional generator trained against a frozen teacher (ZS-CGAN).

    Paper: Y. Choi, M. El-Khamy, J. Lee, "Zero-Shot Learning of a Conditional Generative Adversarial Network for
    Data-Free Network Quantization", ICIP 2021 / arXiv:2210.14392.

    In ``setup`` the module loads the generator from ``generator_path`` when that file exists, else trains a
    :class:`ConditionalGenerator` with :func:`train_generator` (``generator_steps`` steps, progress bar, logged
    losses) and saves it there. Its train loader then yields ``(x, y)`` batches freshly generated every epoch
    (``samples_per_epoch`` samples in all, split over the DDP ranks), or -- ``fixed_pool=True`` -- the same
    seeded pool every epoch; the val loader a fixed seeded pool of ``val_samples``. Everything is deterministic
    in ``seed``: batch ``b`` of epoch ``e`` on rank ``r`` is drawn from its own seeded stream, so ranks see
    distinct samples and a resumed run sees the batches it would have seen. Samples are generated on the CPU in
    the loader (no worker processes); Lightning moves them to the model's device.

    What the paper says and what this module does: the stored copies of the paper we could read stop after its
    abstract and introduction, so the loss formulas are not taken from its equations. From the abstract: a
    conditional generator is trained with no training data, only the pretrained classifier, to produce labelled
    samples whose characteristics mimic the training data "by using the statistics stored in the batch
    normalization layers"; the samples are then used for data-free quantization (QAT with distillation from the
    FP model: :class:`~lightning_quant.callbacks.DistillationCallback`). Our loss is the one the issue specifies:
    cross-entropy of the teacher on the conditioning labels + ``bn_weight`` times the BN-statistics distance of
    every BN layer's input (``bn_loss="kl"``: per-channel Gaussian KL divergence, our default, the form the same
    authors used for BN statistics in their earlier data-free work as far as we recall -- unverified here; or
    ``"l2"``: squared distances of mean and variance, GDFQ-style), plus ``diversity_weight`` times a mode-seeking
    diversity term (our addition, default 0.3: without it the generator collapsed whole classes onto one image and the
    W4A4 student lost them on real data; see :class:`GeneratorTrainer`). No adversarial student term.

    ``source="noise"`` serves standard-normal inputs labelled by the teacher's prediction instead: the data-free
    floor of the benchmark (needs no BatchNorm, trains nothing). ``source="distilled"`` is the ZeroQ-style
    baseline (Cai et al. 2020): no generator, a fixed pool of inputs optimised directly against the BN statistics
    and labelled by the teacher, from which the batches are drawn.

    Resume: :meth:`state_dict` holds the generator's weights, so a checkpoint of the main run restores the exact
    generator (the generator is trained in ``setup`` before the restore; give ``generator_path`` to skip that).

    Args:
        teacher: the frozen FP classifier (an ``nn.Module`` or LightningModule mapping inputs to logits).
        num_classes: number of classes of the teacher.
        input_shape: ``(C, H, W)`` of the teacher's input.
        samples_per_epoch: training samples per epoch over all ranks.
        batch_size: samples per batch (per rank).
        generator_steps: generator training steps.
        fixed_pool: serve the same seeded pool every epoch instead of fresh samples.
        seed: seed of the generator's initialisation and training and of every served sample.
        teacher_checkpoint: a checkpoint whose ``state_dict`` (Lightning) or whole content (plain state dict) is
            loaded into ``teacher`` in ``setup`` -- how a YAML config gives the trained teacher.
        generator_path: where the trained generator is saved, and loaded from when it exists.
        latent_dim: size of the generator's latent.
        generator_width: channels of the generator's first feature map.
        generator_batch_size: samples per generator training step.
        generator_lr: Adam learning rate of the generator.
        bn_weight: weight of the BN-statistics term.
        bn_loss: ``"kl"`` or ``"l2"``.
        diversity_weight: weight of the generator's mode-seeking diversity term (see :class:`GeneratorTrainer`).
        val_samples: size of the validation pool (0: no val loader).
        source: ``"generator"`` (ZS-CGAN), ``"distilled"`` (ZeroQ-style baseline: a pool of ``samples_per_epoch``
            inputs optimised to match the BN statistics, ``generator_steps`` steps in all, see
            :func:`distill_inputs`) or ``"noise"`` (Gaussian inputs, teacher labels).
        rank: this process's rank and ``world_size`` the number of ranks; ``None``: the Trainer's (or 0 and 1).
        world_size: see ``rank``.
        generator_trainer_kwargs: extra ``L.Trainer`` arguments for the generator training.

    Example:
        >>> dm = GeneratorDataModule(teacher, num_classes=10, input_shape=(1, 28, 28))  # doctest: +SKIP
        >>> qat = QuantizationAwareTraining(4, 4, freeze_bn_after_epochs=0)  # doctest: +SKIP
        >>> trainer = L.Trainer(callbacks=[DistillationCallback(), qat])  # doctest: +SKIP
        >>> trainer.fit(student_with_teacher_weights, datamodule=dm)  # doctest: +SKIP
    """

    SOURCES: ClassVar[tuple[str, ...]] = ("generator", "distilled", "noise")
    BN_LOSSES: ClassVar[tuple[str, ...]] = ("kl", "l2")

    def __init__(
        self,
        teacher: nn.Module,
        num_classes: int,
        input_shape: Sequence[int],
        samples_per_epoch: int = 10_000,
        batch_size: int = 128,
        generator_steps: int = 2_000,
        fixed_pool: bool = False,
        seed: int = 0,
        teacher_checkpoint: str | None = None,
        generator_path: str | None = None,
        latent_dim: int = 64,
        generator_width: int = 64,
        generator_batch_size: int = 128,
        generator_lr: float = 1e-3,
        bn_weight: float = 1.0,
        bn_loss: Literal["kl", "l2"] = "kl",
        diversity_weight: float = 0.3,
        val_samples: int = 1_000,
        source: Literal["generator", "distilled", "noise"] = "generator",
        rank: int | None = None,
        world_size: int | None = None,
        generator_trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise QuantizationConfigError(
                f"`teacher` must be a torch.nn.Module (the trained FP classifier), got {type(teacher).__name__}."
            )
        check_int("num_classes", num_classes, minimum=1, fix="pass the classes of the teacher, e.g. `num_classes=10`.")
        self.input_shape = _check_shape("input_shape", input_shape)
        check_int("samples_per_epoch", samples_per_epoch, minimum=1, fix="pass e.g. `samples_per_epoch=10_000`.")
        check_int("batch_size", batch_size, minimum=1, fix="pass e.g. `batch_size=128`.")
        check_int("generator_steps", generator_steps, minimum=1, fix="pass e.g. `generator_steps=2_000`.")
        check_int("generator_batch_size", generator_batch_size, minimum=1, fix="pass e.g. `generator_batch_size=128`.")
        if source not in self.SOURCES:
            raise QuantizationConfigError(f"`source` must be one of {self.SOURCES}, got {source!r}.")
        if bn_loss not in self.BN_LOSSES:
            raise QuantizationConfigError(f"`bn_loss` must be one of {self.BN_LOSSES}, got {bn_loss!r}.")
        if isinstance(val_samples, bool) or not isinstance(val_samples, int) or val_samples < 0:
            raise QuantizationConfigError(f"`val_samples` must be an integer >= 0, got {val_samples!r}.")
        if not bn_weight >= 0:
            raise QuantizationConfigError(f"`bn_weight` must be >= 0, got {bn_weight!r}.")
        if not diversity_weight >= 0:
            raise QuantizationConfigError(
                f"`diversity_weight` must be >= 0, got {diversity_weight!r}. HINT: 0 turns the diversity term off."
            )
        if source != "noise" and teacher_checkpoint is None and not bn_layers(teacher):
            raise QuantizationConfigError(f"`teacher` ({type(teacher).__name__}) has no BatchNorm layer. {_BN_HINT}")
        self.save_hyperparameters(ignore=["teacher"])
        self.teacher = teacher
        self.num_classes = num_classes
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.generator_steps = generator_steps
        self.fixed_pool = fixed_pool
        self.seed = seed
        self.teacher_checkpoint = teacher_checkpoint
        self.generator_path = generator_path
        self.latent_dim = latent_dim
        self.generator_width = generator_width
        self.generator_batch_size = generator_batch_size
        self.generator_lr = generator_lr
        self.bn_weight = bn_weight
        self.bn_loss = bn_loss
        self.diversity_weight = diversity_weight
        self.val_samples = val_samples
        self.source = source
        self._rank = rank
        self._world_size = world_size
        self.generator_trainer_kwargs = dict(generator_trainer_kwargs or {})
        self.generator: ConditionalGenerator | None = None
        self.pool: tuple[Tensor, Tensor] | None = None  # source="distilled": the optimised inputs and labels
        self.training_history: list[dict[str, float]] = []
        self.generator_seconds: float | None = None
        self._pending_state: dict[str, Tensor] | None = None
        self._ready = False

    # -- ranks and epochs ------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank (the argument, else the attached Trainer's global rank, else 0)."""
        if self._rank is not None:
            return self._rank
        trainer = self.trainer
        return trainer.global_rank if trainer is not None else 0

    @property
    def world_size(self) -> int:
        """The number of ranks (the argument, else the attached Trainer's, else 1)."""
        if self._world_size is not None:
            return self._world_size
        trainer = self.trainer
        return trainer.world_size if trainer is not None else 1

    def current_epoch(self) -> int:
        """The attached Trainer's current epoch (0 without one): which fresh stream the train loader draws."""
        trainer = self.trainer
        return trainer.current_epoch if trainer is not None else 0

    # -- generator -------------------------------------------------------------------------------------------
    def _load_teacher(self) -> None:
        if self.teacher_checkpoint is None:
            return
        ckpt = load_weights_only(self.teacher_checkpoint, "teacher_checkpoint")
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        self.teacher.load_state_dict(state)
        self.teacher_checkpoint = None  # loaded once

    def setup(self, stage: str | None = None) -> None:
        """Load the teacher checkpoint, then load or train the generator (once; later calls do nothing)."""
        if self._ready:
            return
        self._load_teacher()
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        if self.source != "noise" and not bn_layers(self.teacher):
            raise QuantizationConfigError(
                f"`teacher` ({type(self.teacher).__name__}) has no BatchNorm layer. {_BN_HINT}"
            )
        if self.source == "generator":
            self.generator = self._build_generator()
        elif self.source == "distilled" and self.pool is None:
            start = time.perf_counter()
            self.pool = distill_inputs(
                self.teacher,
                self.samples_per_epoch,
                self.input_shape,
                self.generator_steps,
                batch_size=self.generator_batch_size,
                bn_loss=self.bn_loss,
                seed=self.seed,
            )
            self.generator_seconds = time.perf_counter() - start
        self._ready = True

    def _build_generator(self) -> ConditionalGenerator:
        path = self.generator_path
        if self._pending_state is not None or (path is not None and Path(path).exists()):
            generator = ConditionalGenerator(self.latent_dim, self.num_classes, self.input_shape, self.generator_width)
            if self._pending_state is not None:
                generator.load_state_dict(self._pending_state)
                self._pending_state = None
            else:
                generator = ConditionalGenerator.load(path)  # type: ignore[arg-type]
                rank_zero_info(f"ZS-CGAN generator loaded from {path}")
            return generator.eval()
        torch.manual_seed(self.seed)  # the generator's initialisation (identical on every rank)
        generator = ConditionalGenerator(self.latent_dim, self.num_classes, self.input_shape, self.generator_width)
        module = train_generator(
            generator,
            self.teacher,
            self.generator_steps,
            trainer_kwargs=self._inner_trainer_kwargs(),
            batch_size=self.generator_batch_size,
            lr=self.generator_lr,
            bn_weight=self.bn_weight,
            bn_loss=self.bn_loss,
            diversity_weight=self.diversity_weight,
            seed=self.seed,
        )
        self.teacher.cpu()
        generator.cpu()
        self.training_history = module.history
        self.generator_seconds = module.seconds  # type: ignore[attr-defined]
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # every rank trained the same seeded generator; rank 0's weights make it exact
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in generator.state_dict().items()}, src=0)
            generator.load_state_dict(state)
        if path is not None and self.rank == 0:
            generator.save(path)
            rank_zero_info(f"ZS-CGAN generator saved to {path}")
        return generator.eval()

    def _inner_trainer_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        trainer = self.trainer
        if trainer is not None:
            device = trainer.strategy.root_device
            if device.type == "cuda":
                kwargs.update(accelerator="gpu", devices=[device.index or 0])
            kwargs.update(enable_progress_bar=trainer.progress_bar_callback is not None)
        kwargs.update(self.generator_trainer_kwargs)
        return kwargs

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` labelled samples ``(x, y)`` on the CPU, drawn from the seeded ``generator`` (a ``torch.Generator``)."""
        if not self._ready:
            self.setup("fit")
        if self.source == "noise":
            x = torch.randn(n, *self.input_shape, generator=generator)
            y = self.teacher(x).argmax(dim=1)
            return x, y
        if self.source == "distilled":
            assert self.pool is not None
            index = torch.randint(len(self.pool[0]), (n,), generator=generator)
            return self.pool[0][index], self.pool[1][index]
        assert self.generator is not None
        return self.generator.sample(n, generator)

    # -- loaders ---------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        per_rank = math.ceil(self.samples_per_epoch / self.world_size)
        return DataLoader(_GeneratedBatches(self, per_rank, stream=0, fixed=self.fixed_pool), batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_samples == 0:
            return []
        per_rank = math.ceil(self.val_samples / self.world_size)
        return DataLoader(_GeneratedBatches(self, per_rank, stream=1, fixed=True), batch_size=None)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The generator's weights, or the distilled pool (so a resumed run serves the same samples)."""
        if self.pool is not None:
            return {"distilled_pool": self.pool}
        if self.generator is None:
            return {}
        return {"generator_state_dict": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "distilled_pool" in state_dict:
            self.pool = state_dict["distilled_pool"]
            return
        state = state_dict.get("generator_state_dict")
        if state is None:
            return
        if self.generator is not None:
            self.generator.load_state_dict(state)
        else:
            self._pending_state = state
