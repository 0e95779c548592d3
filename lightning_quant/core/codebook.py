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
* ``vector_frozen`` -- per-vector (per weight, or per kernel) frozen mask: a frozen vector keeps its entry, and a
  vector's entry is frozen whenever the vector is. :meth:`CodebookQuantizer.freeze` freezes entries with every
  vector assigned to them; :meth:`CodebookQuantizer.freeze_vectors` freezes chosen vectors (and their entries), so
  an incremental schedule can freeze an exact number of weights, part of a cluster included;
* ``partial`` -- incremental mode (SLQ/MLQ): weights that are not frozen pass through in float and train as
  usual; only frozen weights take their entry's value.

Shared codebooks (kernel quantization's ``codebook="shared"``): :func:`share_codebook` makes several quantizers --
one per layer, each with its own ``indices`` -- use the codebook of the first of them (its *owner*). The others keep
no ``codebook``/``codebook_scale``/``frozen``/``frozen_values`` of their own and read the owner's, so there is one
Parameter (one optimizer entry, gradients from every layer summed into it) and one step size; the owner alone stores
them (:meth:`~CodebookQuantizer.side_tensors`, state dict), so sizes count the codebook once. A shared codebook is
fitted by :func:`fit_shared_codebook` on the kernels of all its layers together; fitting one of its quantizers alone
raises. The grouping is structural (``LayerSpec.codebook_share``): ``quantize_model`` links the quantizers, so a
checkpoint of a model with shared codebooks loads strictly into a model quantized with the same recipe.

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


def power_of_two_entries(x: Tensor, num_entries: int, *, top: Literal["floor", "inq"] = "floor") -> Tensor:
    """``num_entries`` (odd) scalar codebook entries ``0, +t, -t, +t/2, -t/2, ...`` (``[K, 1]``), ``t`` a power of two.

    ``top="floor"``: ``t = 2**floor(log2 max|x|)``, the initial centroids of SLQ's k-means (Xu et al., AAAI 2018,
    as their released code sets them). ``top="inq"``: ``t = 2**floor(log2(4 max|x| / 3))``, the largest power of
    incremental network quantization (INQ, Zhou et al., ICLR 2017), whose ``(K - 1) / 2`` powers below it and 0 are
    its whole codebook. An all-zero ``x`` takes ``t = 1``.

    >>> power_of_two_entries(torch.tensor([0.3, -0.9, 0.05]), 5).flatten().tolist()
    [0.0, 0.5, -0.5, 0.25, -0.25]
    >>> power_of_two_entries(torch.tensor([0.3, -0.9, 0.05]), 3, top="inq").flatten().tolist()
    [0.0, 1.0, -1.0]
    """
    if isinstance(num_entries, bool) or not isinstance(num_entries, int) or num_entries < 1 or num_entries % 2 == 0:
        raise QuantizationConfigError(
            f"`num_entries` must be an odd positive integer (0 and pairs +-t), got {num_entries!r}."
        )
    if top not in ("floor", "inq"):
        raise QuantizationConfigError(f"`top` must be 'floor' or 'inq', got {top!r}.")
    peak = float(x.detach().abs().max()) if x.numel() else 0.0
    if not math.isfinite(peak):
        raise QuantizationConfigError("`x` holds non-finite values (inf or nan): no power-of-two codebook fits it.")
    if peak == 0.0:
        t = 1.0
    else:
        t = 2.0 ** math.floor(math.log2(peak * 4.0 / 3.0 if top == "inq" else peak))
    values = [0.0]
    for j in range((num_entries - 1) // 2):
        values += [t / 2.0**j, -t / 2.0**j]
    return torch.tensor(values, dtype=torch.float32, device=x.device).reshape(-1, 1)


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
        shared: the quantizer will share its codebook with others (:func:`share_codebook`): the entries may
            outnumber this weight's vectors (the group's vectors together must not be fewer).
    """

    KIND = "codebook"
    VECTORS: ClassVar[tuple[str, ...]] = ("scalar", "kernel")
    # class-level defaults of the shared-codebook links (instances set their own in __init__ / share_codebook)
    _shared: bool = False
    _codebook_owner: CodebookQuantizer | None = None

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
        shared: bool = False,
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
        if num_entries > num_vectors and not shared:
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
        self.register_buffer("vector_frozen", torch.zeros(num_vectors, dtype=torch.long))
        self.register_buffer("codebook_scale", torch.ones(1))
        self.register_buffer("partial", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))
        self._initialized = False
        self._partial = False
        self._any_frozen = False
        # shared codebooks (see `share_codebook`): plain attributes, not submodules, so that the owner is
        # registered (and saved) once, under its own layer
        self._shared = shared
        self._codebook_owner: CodebookQuantizer | None = None

    def __getattr__(self, name: str) -> Any:
        # a quantizer that shares another's codebook reads the owner's entries, step size and frozen state
        if name in _SHARED_STATE:
            owner = self.__dict__.get("_codebook_owner")
            if owner is not None:
                return getattr(owner, name)
        return super().__getattr__(name)

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
                shared=getattr(spec, "codebook_share", None) is not None,
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
    def is_shared(self) -> bool:
        """Whether this quantizer belongs to a shared codebook (as its owner or as a member)."""
        return self._shared

    @property
    def codebook_owner(self) -> CodebookQuantizer:
        """The quantizer that holds the codebook this one uses (itself unless it is a member of a shared one)."""
        return self._codebook_owner if self._codebook_owner is not None else self

    @property
    def frozen_vector_mask(self) -> Tensor:
        """Boolean mask of the frozen vectors (weights, or kernels), ``[num_vectors]``."""
        return self.vector_frozen.bool()

    @property
    def is_partial(self) -> bool:
        """Incremental mode: weights of unfrozen entries pass through in float."""
        return self._partial

    @property
    def complete(self) -> bool:
        """Whether forward replaces every weight by an entry (not incremental, or every weight frozen)."""
        return not self._partial or bool(self.vector_frozen.all())

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
        if self._codebook_owner is not None:
            return self._codebook_owner.effective_codebook()
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
        vector_frozen = self.vector_frozen.bool()[:, None]
        if self._partial:
            out = torch.where(vector_frozen, values, vectors)
        else:
            # the entry's value, with the straight-through gradient to the float weight (none for frozen weights)
            out = values + (vectors - vectors.detach()) * (~vector_frozen).to(x.dtype)
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
        # incremental mode mid-way: weights that are not frozen are still float
        frozen_vectors = int(self.vector_frozen.sum())
        return frozen_vectors * self.index_bits + (self.num_vectors - frozen_vectors) * self.dim * FLOAT_BITS

    def codebook_codes(self) -> Tensor:
        """The integer codes of the entries on their ``codebook_bits`` grid (``[K, D]``, int32)."""
        qmin, qmax = self._grid()
        book = self.effective_codebook().detach()
        return torch.clamp(torch.round(book * (1.0 / self.codebook_scale)), qmin, qmax).to(torch.int32)

    def side_tensors(self) -> dict[str, tuple[Tensor, int]]:
        if self._codebook_owner is not None:
            return {}  # a shared codebook is stored once, with its owner
        if self.codebook_bits is None:
            return {"codebook": (self.effective_codebook().detach().float(), FLOAT_BITS)}
        return {
            "codebook": (self.codebook_codes(), self.codebook_bits),
            "codebook_scale": (self.codebook_scale.detach().float(), FLOAT_BITS),
        }

    @torch.no_grad()
    def load_codes(self, codes: Tensor, side: dict[str, Tensor]) -> None:
        if self._codebook_owner is not None:  # the owner loads the shared codebook from its own entry
            self.indices.copy_(codes.reshape(-1).long())
            self.vector_frozen.zero_()
            self.partial.zero_()
            self._partial = False
            self.initialized.fill_(1)
            self._initialized = True
            return
        book = side["codebook"].reshape(self.num_entries, self.dim)
        if self.codebook_bits is not None:
            self.codebook_scale.copy_(side["codebook_scale"].reshape(1))
            book = book.to(torch.float32) * self.codebook_scale
        self.codebook.data.copy_(book.to(self.codebook))
        self.indices.copy_(codes.reshape(-1).long())
        self.frozen.zero_()
        self.vector_frozen.zero_()
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
    def fit(
        self,
        x: Tensor,
        *,
        iterations: int | None = None,
        init: Tensor | None = None,
        assign_to_frozen: bool = False,
    ) -> float:
        """Cluster the weight ``x`` into the codebook (k-means) and assign every vector; returns the inertia.

        Frozen vectors keep their entries and frozen entries their values; the other vectors are clustered

        * into the unfrozen entries (the default), starting from their current values once fitted, from k-means++
          otherwise;
        * with ``assign_to_frozen=True``, into all entries, the frozen ones taking part as fixed centres (a vector
          may join a frozen entry and takes its value when it is frozen itself).

        Args:
            x: the weight.
            iterations: Lloyd iterations (default: the quantizer's ``iterations``; 0 assigns without moving entries).
            init: ``[K, D]`` starting values of the unfrozen entries instead of the above (the rows of frozen entries
                are ignored); the ``fixed_values`` entries must hold their values.
            assign_to_frozen: see above.

        ``fixed_values`` entries never move. With fewer vectors to cluster than entries, the vectors are assigned
        to the nearest entry and no entry moves. The codebook scale is reset from the entries when no entry is
        frozen.

        Raises:
            QuantizationConfigError: the quantizer shares its codebook (fit the group with
                :func:`fit_shared_codebook`), or a bad ``init``.
        """
        if self._shared:
            raise QuantizationConfigError(
                f"This codebook quantizer ({self.extra_repr()}) shares its codebook with other layers, so fitting it "
                "on its own weight alone would re-cluster the others' entries. HINT: fit the group together with "
                "`lightning_quant.core.codebook.fit_shared_codebook(quantizers, weights)` (KernelQuantizationCallback "
                "does this when training starts)."
            )
        vectors = self._vectors(x.detach()).float()
        frozen = self.frozen.bool()
        keep = self.vector_frozen.bool() if self._initialized else torch.zeros_like(self.indices).bool()
        points = vectors[~keep]
        all_entries = torch.arange(self.num_entries, device=frozen.device)
        entries = all_entries if assign_to_frozen else all_entries[~frozen]
        if entries.numel() == 0 or points.shape[0] == 0:
            return 0.0
        # the fixed values are the first entries (placed there by the first fit) and never move
        movable = (~frozen)[entries] & (entries >= len(self.fixed_values))
        current = torch.where(frozen[:, None], self.frozen_values, self.codebook.detach()).float()
        start: Tensor | int
        if init is not None:
            start = torch.where(frozen[:, None], current, self._check_init(init).to(current))[entries]
        elif self._initialized:
            start = current[entries]
        elif self.fixed_values:
            start = self._fixed_init(points, entries.numel())
        else:
            start = min(entries.numel(), points.shape[0])
        steps = self.iterations if iterations is None else iterations
        if isinstance(start, Tensor) and start.shape[0] > points.shape[0]:
            labels, dists = nearest(points, start)
            centers, inertia = start, float(dists.double().sum())
        else:
            fixed = ~movable[: start if isinstance(start, int) else start.shape[0]]
            result = kmeans(points, start, iterations=steps, fixed=fixed, seed=self.seed)
            centers, labels, inertia = result.centers, result.labels, result.inertia
        if centers.shape[0] < entries.numel():  # fewer points than free entries: repeat the last centre
            centers = torch.cat([centers, centers[-1:].expand(entries.numel() - centers.shape[0], -1)])
        book = self.codebook.detach().clone()
        free = ~frozen[entries]
        book[entries[free]] = centers[free].to(book.dtype)
        if not bool(frozen.any()) and self.codebook_bits is not None:
            self._set_scale(book)
        self.codebook.data.copy_(book)
        indices = self.indices.clone()
        indices[~keep] = entries[labels]
        self.indices.copy_(indices)
        self.initialized.fill_(1)
        self._initialized = True
        return inertia

    def _check_init(self, init: Tensor) -> Tensor:
        init = init.detach().reshape(init.shape[0], -1) if init.dim() > 0 else init
        if init.dim() != 2 or tuple(init.shape) != (self.num_entries, self.dim):
            raise QuantizationConfigError(
                f"`init` must hold one starting value per entry, shape [{self.num_entries}, {self.dim}], got "
                f"{list(init.shape)}."
            )
        if not bool(torch.isfinite(init).all()):
            raise QuantizationConfigError("`init` holds non-finite values (inf or nan).")
        for entry, value in enumerate(self.fixed_values):
            if float(init[entry, 0]) != value:
                raise QuantizationConfigError(
                    f"`init` row {entry} must be the fixed value {value} (`fixed_values` are the first entries), got "
                    f"{float(init[entry, 0])}."
                )
        return init

    @torch.no_grad()
    def rescale(self) -> bool:
        """Reset the step size of ``codebook_bits`` from the current entries (``max |entry| / qmax``, as :meth:`fit`
        sets it), so that entries trained past the old range are represented again; returns whether it changed.

        No-op for float codebooks, codebooks with frozen entries (their values must not move) and members of a
        shared codebook (the owner holds the step size).
        """
        if self.codebook_bits is None or self._codebook_owner is not None or bool(self.frozen.any()):
            return False
        before = self.codebook_scale.clone()
        self._set_scale(self.codebook.detach())
        return not torch.equal(before, self.codebook_scale)

    def _set_scale(self, book: Tensor) -> None:
        """The symmetric step size that puts the largest entry of ``book`` at ``qmax``."""
        _, qmax = self._grid()
        self.codebook_scale.fill_(float(book.abs().max().clamp_min(1e-8)) / qmax)

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
        """Move every vector of ``x`` that is not frozen to its nearest unfrozen (effective) entry; returns how many
        changed."""
        vectors = self._vectors(x.detach()).float()
        free = ~self.frozen.bool()
        if not bool(free.any()):
            return 0
        keep = self.vector_frozen.bool()
        book = self.effective_codebook().detach().float()
        free_index = torch.nonzero(free).flatten()
        labels, _ = nearest(vectors[~keep], book[free])
        indices = self.indices.clone()
        indices[~keep] = free_index[labels]
        changed = int((indices != self.indices).sum())
        self.indices.copy_(indices)
        return changed

    def _entry_mask(self, entries: Tensor | Sequence[int]) -> Tensor:
        mask = torch.zeros(self.num_entries, dtype=torch.bool, device=self.frozen.device)
        if isinstance(entries, Tensor) and entries.dtype == torch.bool:
            mask |= entries.to(mask.device)
        else:
            mask[torch.as_tensor(entries, dtype=torch.long, device=mask.device)] = True
        return mask

    @torch.no_grad()
    def _freeze_entries(self, mask: Tensor) -> None:
        book = self.effective_codebook().detach()
        newly = mask & ~self.frozen.bool()
        self.frozen_values[newly] = book[newly].to(self.frozen_values)
        self.frozen[newly] = 1
        self._any_frozen = bool(self.frozen.any())
        self.codebook_owner._any_frozen = self._any_frozen  # a shared codebook's frozen entries are the owner's

    @torch.no_grad()
    def freeze(self, entries: Tensor | Sequence[int]) -> None:
        """Freeze entries (a boolean mask or indices) at their current effective values, and every vector assigned
        to them (for a quantizer that shares a codebook: entries of the shared codebook, vectors of this layer)."""
        mask = self._entry_mask(entries)
        self._freeze_entries(mask)
        self.vector_frozen[mask.index_select(0, self.indices)] = 1

    @torch.no_grad()
    def freeze_vectors(self, vectors: Tensor) -> int:
        """Freeze the vectors a boolean mask selects (``[num_vectors]``, or the weight's shape for a scalar
        codebook) on their current entries, and those entries at their current effective values; the other vectors
        of those entries stay free. Returns how many vectors were newly frozen."""
        mask = vectors.to(self.vector_frozen.device).reshape(-1)
        if mask.dtype != torch.bool or mask.numel() != self.num_vectors:
            raise QuantizationConfigError(
                f"`vectors` must be a boolean mask of the {self.num_vectors} vectors, got dtype {vectors.dtype} and "
                f"{vectors.numel()} elements."
            )
        newly = int((mask & ~self.vector_frozen.bool()).sum())
        used = torch.zeros(self.num_entries, dtype=torch.bool, device=mask.device)
        used[self.indices[mask]] = True
        self._freeze_entries(used)
        self.vector_frozen[mask] = 1
        return newly

    @torch.no_grad()
    def snap(self, x: Tensor) -> None:
        """Write the value of every frozen vector into the weight ``x`` in place (the others are left alone), so the
        float weight agrees with forward where it is frozen (``dequantize_model``, packing)."""
        vectors = self._vectors(x)
        values = self.effective_codebook().detach().to(x.dtype).index_select(0, self.indices)
        x.copy_(torch.where(self.vector_frozen.bool()[:, None], values, vectors).reshape(x.shape))

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
            + (", shared" if self._shared else "")
        )


#: the state a quantizer reads from its owner when it shares the owner's codebook
_SHARED_STATE = frozenset({"codebook", "codebook_scale", "frozen", "frozen_values"})


def check_shareable(quantizers: Sequence[Quantizer], names: Sequence[str] | None = None) -> None:
    """Raise what :func:`share_codebook` would raise for these quantizers, changing nothing."""
    where = list(names) if names is not None else [f"quantizer {i}" for i in range(len(quantizers))]
    if not quantizers:
        raise QuantizationConfigError("`share_codebook` needs at least one quantizer.")
    owner = quantizers[0]
    for name, q in zip(where, quantizers, strict=True):
        if not isinstance(q, CodebookQuantizer):
            raise QuantizationConfigError(
                f"{name} cannot share a codebook: its weight quantizer is a {type(q).__name__}. HINT: give every "
                "layer of a shared codebook `weight_kind='codebook'`."
            )
        if not q.is_shared:
            raise QuantizationConfigError(
                f"{name}'s codebook quantizer was not built to share its codebook. HINT: build it with `shared=True` "
                "(a LayerSpec with `codebook_share` does)."
            )
        if q._codebook_owner is not None and q._codebook_owner is not owner:
            raise QuantizationConfigError(f"{name} already shares another layer's codebook.")
    first = where[0]
    assert isinstance(owner, CodebookQuantizer)
    for name, q in zip(where[1:], quantizers[1:], strict=True):
        assert isinstance(q, CodebookQuantizer)
        mine = (q.num_entries, q.vector, q.dim, q.codebook_bits)
        theirs = (owner.num_entries, owner.vector, owner.dim, owner.codebook_bits)
        if mine != theirs:
            raise QuantizationConfigError(
                f"{name} cannot share the codebook of {first}: (entries, vector, entry size, codebook bits) are {mine} "
                f"and {theirs}. HINT: a shared codebook needs equal entries and codebook bits, and kernels of one "
                "size (group layers by kernel size)."
            )
    vectors = sum(q.num_vectors for q in quantizers)  # type: ignore[attr-defined]
    if owner.num_entries > vectors:
        raise QuantizationConfigError(
            f"A shared codebook of {owner.num_entries} entries is larger than the {vectors} {owner.vector}s of its "
            f"layers {where}. HINT: use at most {vectors} entries."
        )


def share_codebook(quantizers: Sequence[Quantizer], names: Sequence[str] | None = None) -> None:
    """Make every quantizer after the first use the first one's codebook (see the module docs).

    The members drop their own ``codebook``, ``codebook_scale``, ``frozen`` and ``frozen_values`` and read the
    owner's; each keeps its own ``indices``. Idempotent; everything is checked before anything changes.

    Args:
        quantizers: codebook quantizers built with ``shared=True``, the owner first; equal entries, vector kind,
            entry size and codebook bits.
        names: the layers' names, for messages.

    Raises:
        QuantizationConfigError: a quantizer that cannot share (another kind, not built to share, already sharing
            another codebook, different entries or entry size), or fewer vectors in all than entries.
    """
    check_shareable(quantizers, names)
    owner = quantizers[0]
    for q in quantizers[1:]:
        assert isinstance(q, CodebookQuantizer) and isinstance(owner, CodebookQuantizer)
        if q._codebook_owner is owner:
            continue
        q._parameters.pop("codebook", None)
        for key in ("codebook_scale", "frozen", "frozen_values"):
            q._buffers.pop(key, None)
        q.__dict__["_codebook_owner"] = owner  # a plain reference: the owner stays registered under its own layer


@torch.no_grad()
def fit_shared_codebook(
    quantizers: Sequence[CodebookQuantizer], weights: Sequence[Tensor], *, iterations: int | None = None
) -> float:
    """k-means of the vectors of every weight together into the shared codebook; assigns every quantizer's vectors.

    Starts from the current entries when the codebook was fitted before, from seeded k-means++ (the owner's
    ``seed``) otherwise. The step size of ``codebook_bits`` is reset from the entries. Returns the inertia.

    Args:
        quantizers: the quantizers of one shared codebook, the owner first (as linked by :func:`share_codebook`).
        weights: the weight each quantizer encodes, in the same order.
        iterations: Lloyd iterations (default: the owner's ``iterations``).

    Raises:
        QuantizationConfigError: the quantizers do not share one codebook, or it has frozen entries.
    """
    if len(quantizers) != len(weights) or not quantizers:
        raise QuantizationConfigError(
            f"`fit_shared_codebook` needs one weight per quantizer, got {len(quantizers)} quantizers and "
            f"{len(weights)} weights."
        )
    owner = quantizers[0]
    if any(q.codebook_owner is not owner for q in quantizers):
        raise QuantizationConfigError(
            "`fit_shared_codebook`: the quantizers do not all use the first one's codebook. HINT: link them with "
            "`share_codebook(quantizers)` (the owner first)."
        )
    if bool(owner.frozen.any()):
        raise QuantizationConfigError("`fit_shared_codebook` cannot refit a shared codebook with frozen entries.")
    parts = [q._vectors(w.detach()).float() for q, w in zip(quantizers, weights, strict=True)]
    points = torch.cat(parts)
    init: Tensor | int = owner.codebook.detach().float() if owner.is_initialized else owner.num_entries
    result = kmeans(points, init, iterations=iterations or owner.iterations, seed=owner.seed)
    owner.codebook.data.copy_(result.centers.to(owner.codebook.dtype))
    if owner.codebook_bits is not None:
        owner._set_scale(owner.codebook.detach())
    start = 0
    for q, part in zip(quantizers, parts, strict=True):
        q.indices.copy_(result.labels[start : start + part.shape[0]])
        start += part.shape[0]
        q.initialized.fill_(1)
        q._initialized = True
    return result.inertia


__all__ = [
    "CodebookQuantizer",
    "check_shareable",
    "fit_shared_codebook",
    "index_bits_for",
    "power_of_two_entries",
    "share_codebook",
]
