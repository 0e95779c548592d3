"""Codebook quantizer: a weight stored as one index per scalar (or per k x k kernel) into K learned entries.

The weight quantizer of kernel quantization (KQ) and incremental quantization (SLQ/MLQ). State (all in the
state dict, so a checkpoint restores it exactly):

* ``codebook`` -- a ``[K, D]`` Parameter (``D = 1`` for scalars, ``k*k`` (the kernel volume) for kernels), trained by
  the user's optimizer; the gradient of an entry is the sum of the gradients of the weights that use it (the
  backward of the gather);
* ``indices`` -- one entry index per vector of the weight (a buffer: fixed while the entries train; re-assigned
  only by :meth:`CodebookQuantizer.fit` / :meth:`CodebookQuantizer.reassign`);
* ``frozen`` / ``frozen_values`` -- per-entry frozen mask and the values frozen entries keep. Forward takes a frozen
  entry's value from ``frozen_values``, so neither gradients nor optimizer momentum or weight decay acting on the
  ``codebook`` Parameter can move it;
* ``codebook_scale`` -- with ``codebook_bits`` the entries are fake-quantized (symmetric, per codebook) to that many
  bits, so every weight value lies on one uniform grid (QDQ export as integers); the scale is set from the entries
  by :meth:`fit` and kept until the next fit;
* ``partial`` -- incremental mode (SLQ/MLQ): weights whose entry is not frozen pass through in float and train as
  usual; only weights of frozen entries take their entry's value.

Outside incremental mode every weight takes its entry's value in forward; the float weight behind it still gets the
straight-through gradient of its entry (where the entry is not frozen), so a later :meth:`reassign` can move it to
another entry. A quantizer that has never been fitted fits itself (seeded k-means++ and Lloyd,
:func:`~lightning_quant.core.kmeans.kmeans`) on its first input.

>>> import torch
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> w = torch.randn(4, 2, 3, 3)
>>> q = CodebookQuantizer(w.shape, num_entries=4, vector="kernel", codebook_bits=6)
>>> wq = q(w)  # fits 4 kernels (k-means) and replaces each 3x3 kernel by its entry
>>> len(torch.unique(wq.reshape(8, 9), dim=0)) <= 4, q.bits, q.payload_bits(w)
(True, 2, 16)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import MAX_BITS, fake_quantize, quant_range, validate_bits
from lightning_quant.core.kmeans import kmeans, kmeans_plus_plus, nearest
from lightning_quant.core.quantizers import FLOAT_BITS, Quantizer, UniformGrid, register_quantizer

Vector = Literal["scalar", "kernel"]


def index_bits_for(num_entries: int) -> int:
    """Bits of one index into ``num_entries`` entries (at least 1).

    >>> index_bits_for(16), index_bits_for(17), index_bits_for(3), index_bits_for(1)
    (4, 5, 2, 1)
    """
    return max(1, math.ceil(math.log2(num_entries)))


@register_quantizer
class CodebookQuantizer(Quantizer):
    """A codebook of ``num_entries`` scalars or kernels and one index per weight scalar or kernel (see module docs).

    Args:
        weight_shape: shape of the weight it quantizes (``[out, in, *kernel]`` for a conv).
        num_entries: codebook entries K.
        vector: ``"scalar"`` (one index per weight) or ``"kernel"`` (one per k x k kernel, i.e. per ``(out, in)``
            pair of a conv weight).
        index_bits: storage bits of one index; default (and minimum) ``ceil(log2 K)``.
        codebook_bits: fake-quantize the entries to this many bits (2-8), or ``None`` for float entries.
        seed: seed of the k-means++ initialisation.
        iterations: Lloyd iterations of a fit.
        fixed_values: entries with these exact scalar values are kept fixed during every fit (SLQ's 0); scalar
            codebooks only.
    """

    KIND = "codebook"
    VECTORS: ClassVar[tuple[str, ...]] = ("scalar", "kernel")

    def __init__(
        self,
        weight_shape: Sequence[int],
        *,
        num_entries: int,
        vector: Vector = "scalar",
        index_bits: int | None = None,
        codebook_bits: int | None = None,
        seed: int = 0,
        iterations: int = 20,
        fixed_values: Sequence[float] = (),
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in weight_shape)
        if vector not in self.VECTORS:
            raise QuantizationConfigError(f"`vector` must be one of {list(self.VECTORS)}, got {vector!r}.")
        if vector == "kernel" and len(shape) < 3:
            raise QuantizationConfigError(
                f"`vector='kernel'` needs a convolution weight [out, in, *kernel], got shape {list(shape)}. HINT: "
                "use `vector='scalar'` (one index per weight) for Linear layers."
            )
        dim = math.prod(shape[2:]) if vector == "kernel" else 1
        num_vectors = math.prod(shape) // dim
        if isinstance(num_entries, bool) or not isinstance(num_entries, int) or num_entries < 1:
            raise QuantizationConfigError(f"`num_entries` must be a positive integer, got {num_entries!r}.")
        if num_entries > num_vectors:
            unit = "kernels" if vector == "kernel" else "weights"
            raise QuantizationConfigError(
                f"A codebook of {num_entries} entries is larger than the {num_vectors} {unit} it encodes (weight "
                f"shape {list(shape)}). HINT: use at most {num_vectors} entries (index bits <= "
                f"{index_bits_for(num_vectors) if num_vectors > 1 else 1}), or leave this layer out."
            )
        minimum = index_bits_for(num_entries)
        if index_bits is None:
            index_bits = minimum
        if isinstance(index_bits, bool) or not isinstance(index_bits, int) or not minimum <= index_bits <= MAX_BITS:
            raise QuantizationConfigError(
                f"`index_bits` must be an integer in [{minimum}, {MAX_BITS}] for {num_entries} entries, "
                f"got {index_bits!r}."
            )
        if codebook_bits is not None:
            validate_bits("codebook_bits", codebook_bits)
        if fixed_values and vector != "scalar":
            raise QuantizationConfigError("`fixed_values` applies to scalar codebooks only (`vector='scalar'`).")
        if len(fixed_values) > num_entries:
            raise QuantizationConfigError(
                f"`fixed_values` has {len(fixed_values)} values for a codebook of {num_entries} entries."
            )
        self.weight_shape = shape
        self.vector: Vector = vector
        self.dim = dim
        self.num_vectors = num_vectors
        self.num_entries = num_entries
        self.index_bits = index_bits
        self.codebook_bits = codebook_bits
        self.seed = seed
        self.iterations = iterations
        self.fixed_values = tuple(float(v) for v in fixed_values)
        self.enabled = True
        self.observing = False
        self.learnable = True
        self.codebook = nn.Parameter(torch.zeros(num_entries, dim))
        self.register_buffer("indices", torch.zeros(num_vectors, dtype=torch.long))
        # integers, not bools: DDP broadcasts buffers and gloo has no bool
        self.register_buffer("frozen", torch.zeros(num_entries, dtype=torch.long))
        self.register_buffer("frozen_values", torch.zeros(num_entries, dim))
        self.register_buffer("codebook_scale", torch.ones(1))
        self.register_buffer("partial", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))
        self._initialized = False
        self._partial = False
        self._any_frozen = False

    @classmethod
    def for_weight(cls, weight: Tensor, spec: Any, where: str = "layer") -> CodebookQuantizer:
        """The codebook quantizer a ``LayerSpec`` asks for: ``codebook_size`` entries (default
        ``2**weight_bits``), ``weight_bits`` bits per index, ``codebook_vector`` and ``codebook_bits``."""
        if isinstance(spec.weight_bits, tuple):
            raise QuantizationConfigError(
                f"{where}: a codebook quantizer has one index width, got per-channel widths. HINT: pass one int "
                "`weight_bits` (the index bits)."
            )
        size = spec.codebook_size if spec.codebook_size is not None else 2**spec.weight_bits
        try:
            return cls(
                weight.shape,
                num_entries=size,
                vector=spec.codebook_vector,
                index_bits=spec.weight_bits,
                codebook_bits=spec.codebook_bits,
                fixed_values=(0.0,) if spec.codebook_zero else (),
            ).to(weight.device)
        except QuantizationConfigError as err:
            raise QuantizationConfigError(f"{where}: {err}") from None

    # -- protocol --------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bits of one index."""
        return self.index_bits

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def frozen_mask(self) -> Tensor:
        """Boolean mask of the frozen entries."""
        return self.frozen.bool()

    @property
    def is_partial(self) -> bool:
        """Incremental mode: weights of unfrozen entries pass through in float."""
        return self._partial

    @property
    def complete(self) -> bool:
        """Whether forward replaces every weight by an entry (not incremental, or every entry frozen)."""
        return not self._partial or bool(self.frozen.all())

    def _vectors(self, x: Tensor) -> Tensor:
        if x.numel() != self.num_vectors * self.dim:
            raise QuantizationConfigError(
                f"This codebook quantizer encodes a weight of shape {list(self.weight_shape)}, got a tensor of shape "
                f"{list(x.shape)}."
            )
        return x.reshape(self.num_vectors, self.dim)

    def _grid(self) -> tuple[int, int]:
        assert self.codebook_bits is not None
        return quant_range(self.codebook_bits, signed=True)

    def effective_codebook(self) -> Tensor:
        """The ``[K, D]`` entries forward uses: fake-quantized to ``codebook_bits``, frozen entries frozen."""
        book = self.codebook
        if self.codebook_bits is not None:
            qmin, qmax = self._grid()
            zero = torch.zeros(1, device=book.device)
            book = fake_quantize(book, self.codebook_scale, zero, qmin, qmax)
        if self._any_frozen:
            book = torch.where(self.frozen.bool()[:, None], self.frozen_values.to(book.dtype), book)
        return book

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self._initialized:
            self.fit(x)
        vectors = self._vectors(x)
        values = self.effective_codebook().to(x.dtype).index_select(0, self.indices)
        entry_frozen = self.frozen.bool().index_select(0, self.indices)[:, None]
        if self._partial:
            out = torch.where(entry_frozen, values, vectors)
        else:
            # the entry's value, with the straight-through gradient to the float weight (none for frozen entries)
            out = values + (vectors - vectors.detach()) * (~entry_frozen).to(x.dtype)
        return out.reshape(x.shape)

    @torch.no_grad()
    def int_repr(self, x: Tensor) -> Tensor:
        """The entry index of each weight (scalar codebook: the weight's shape) or kernel (``[out, in]``)."""
        self._vectors(x)  # shape check
        return self.indices.reshape(self._code_shape()).to(torch.int32)

    def _code_shape(self) -> tuple[int, ...]:
        return self.weight_shape if self.vector == "scalar" else self.weight_shape[:2]

    @property
    def signed_codes(self) -> bool:
        return False

    def dequantize(self, codes: Tensor) -> Tensor:
        book = self.effective_codebook().detach()
        values = book.index_select(0, codes.reshape(-1).long().to(book.device))
        return values.reshape(*codes.shape, *self.weight_shape[len(codes.shape) :])

    def code_widths(self, codes: Tensor) -> Tensor:
        return torch.tensor(self.index_bits, device=codes.device)

    def payload_bits(self, x: Tensor) -> int:
        self._vectors(x)
        if self.complete:
            return self.num_vectors * self.index_bits
        # incremental mode mid-way: weights of unfrozen entries are still float
        frozen_vectors = int(self.frozen.bool().index_select(0, self.indices).sum())
        return frozen_vectors * self.index_bits + (self.num_vectors - frozen_vectors) * self.dim * FLOAT_BITS

    def codebook_codes(self) -> Tensor:
        """The integer codes of the entries on their ``codebook_bits`` grid (``[K, D]``, int32)."""
        qmin, qmax = self._grid()
        book = self.effective_codebook().detach()
        return torch.clamp(torch.round(book * (1.0 / self.codebook_scale)), qmin, qmax).to(torch.int32)

    def side_tensors(self) -> dict[str, tuple[Tensor, int]]:
        if self.codebook_bits is None:
            return {"codebook": (self.effective_codebook().detach().float(), FLOAT_BITS)}
        return {
            "codebook": (self.codebook_codes(), self.codebook_bits),
            "codebook_scale": (self.codebook_scale.detach().float(), FLOAT_BITS),
        }

    @torch.no_grad()
    def load_codes(self, codes: Tensor, side: dict[str, Tensor]) -> None:
        book = side["codebook"].reshape(self.num_entries, self.dim)
        if self.codebook_bits is not None:
            self.codebook_scale.copy_(side["codebook_scale"].reshape(1))
            book = book.to(torch.float32) * self.codebook_scale
        self.codebook.data.copy_(book.to(self.codebook))
        self.indices.copy_(codes.reshape(-1).long())
        self.frozen.zero_()
        self._any_frozen = False
        self.partial.zero_()
        self._partial = False
        self.initialized.fill_(1)
        self._initialized = True

    def uniform_grid(self) -> UniformGrid | None:
        if self.codebook_bits is None or not self.complete:
            return None
        qmin, qmax = self._grid()
        zero = torch.zeros(1, device=self.codebook_scale.device)
        return UniformGrid(self.codebook_scale.detach().clone(), zero, qmin, qmax, None)

    # -- fitting ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: Tensor, *, iterations: int | None = None) -> float:
        """Cluster the weight ``x`` into the codebook (k-means) and assign every vector; returns the inertia.

        Frozen entries stay as they are, and the vectors assigned to them stay assigned; the other vectors are
        clustered into the unfrozen entries (starting from their current values once fitted, from k-means++
        otherwise). ``fixed_values`` entries never move. The codebook scale is reset from the entries when no entry
        is frozen.
        """
        vectors = self._vectors(x.detach()).float()
        frozen = self.frozen.bool()
        free = ~frozen
        keep = frozen.index_select(0, self.indices) if self._initialized else torch.zeros_like(self.indices).bool()
        points = vectors[~keep]
        k_free = int(free.sum())
        if k_free == 0 or points.shape[0] == 0:
            return 0.0
        free_index = torch.nonzero(free).flatten()
        # the fixed values are the first entries (placed there by the first fit) and never move
        fixed = free_index < len(self.fixed_values)
        if self._initialized:
            init: Tensor | int = self.codebook.detach().float()[free]
        elif self.fixed_values:
            init = self._fixed_init(points, k_free)
        else:
            init = min(k_free, points.shape[0])
        fixed = fixed[: init if isinstance(init, int) else init.shape[0]]
        result = kmeans(points, init, iterations=iterations or self.iterations, fixed=fixed, seed=self.seed)
        centers = result.centers
        if centers.shape[0] < k_free:  # fewer points than free entries: repeat the last centre
            centers = torch.cat([centers, centers[-1:].expand(k_free - centers.shape[0], -1)])
        book = self.codebook.detach().clone()
        book[free] = centers.to(book.dtype)
        if not bool(frozen.any()) and self.codebook_bits is not None:
            _, qmax = self._grid()
            self.codebook_scale.fill_(float(book.abs().max().clamp_min(1e-8)) / qmax)
        self.codebook.data.copy_(book)
        indices = self.indices.clone()
        indices[~keep] = free_index[result.labels]
        self.indices.copy_(indices)
        self.initialized.fill_(1)
        self._initialized = True
        return result.inertia

    def _fixed_init(self, points: Tensor, k: int) -> Tensor:
        """Initial centres with the fixed values first and k-means++ picks for the rest."""
        fixed = torch.tensor(self.fixed_values, device=points.device).reshape(-1, 1)
        rest = k - fixed.shape[0]
        if rest <= 0:
            return fixed[:k]
        return torch.cat([fixed, kmeans_plus_plus(points, min(rest, points.shape[0]), self.seed)])

    @torch.no_grad()
    def recalibrate(self, x: Tensor) -> None:
        self.fit(x)

    @torch.no_grad()
    def reassign(self, x: Tensor) -> int:
        """Move every vector of ``x`` not assigned to a frozen entry to its nearest unfrozen (effective) entry;
        returns how many changed."""
        vectors = self._vectors(x.detach()).float()
        free = ~self.frozen.bool()
        if not bool(free.any()):
            return 0
        keep = self.frozen.bool().index_select(0, self.indices)
        book = self.effective_codebook().detach().float()
        free_index = torch.nonzero(free).flatten()
        labels, _ = nearest(vectors[~keep], book[free])
        indices = self.indices.clone()
        indices[~keep] = free_index[labels]
        changed = int((indices != self.indices).sum())
        self.indices.copy_(indices)
        return changed

    @torch.no_grad()
    def freeze(self, entries: Tensor | Sequence[int]) -> None:
        """Freeze entries (a boolean mask or indices) at their current effective values."""
        mask = torch.zeros(self.num_entries, dtype=torch.bool, device=self.frozen.device)
        if isinstance(entries, Tensor) and entries.dtype == torch.bool:
            mask |= entries.to(mask.device)
        else:
            mask[torch.as_tensor(entries, dtype=torch.long, device=mask.device)] = True
        book = self.effective_codebook().detach()
        newly = mask & ~self.frozen.bool()
        self.frozen_values[newly] = book[newly].to(self.frozen_values)
        self.frozen[newly] = 1
        self._any_frozen = bool(self.frozen.any())

    def set_partial(self, partial: bool) -> None:
        """Switch incremental mode (weights of unfrozen entries in float) on or off."""
        self.partial.fill_(int(partial))
        self._partial = bool(partial)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)
        self._partial = bool(self.partial)
        self._any_frozen = bool(self.frozen.any())

    def extra_repr(self) -> str:
        book = f"{self.codebook_bits}-bit" if self.codebook_bits is not None else "float"
        frozen = int(self.frozen.sum())
        return (
            f"entries={self.num_entries}, vector={self.vector}, index_bits={self.index_bits}, codebook={book}"
            + (f", frozen={frozen}" if frozen else "")
            + (", partial" if self._partial else "")
        )


__all__ = ["CodebookQuantizer", "index_bits_for"]
