"""Integer packing and entropy-style encodings that give a quantized model's real on-disk size.

Everything here is a pure function of tensors (numpy arrays are accepted where values are read), so the
allocators' cost models, the benchmarks and the export callback can all measure "bits per parameter" the
same way.

Dense packing (:func:`pack_bits` / :func:`unpack_bits`)
    ``n`` integers of ``bits`` bits each (1..8) become exactly ``ceil(n * bits / 8)`` bytes. Value ``i``
    occupies bits ``[i * bits, (i + 1) * bits)`` of one little-endian bit stream: stream bit ``k`` is bit
    ``k % 8`` (least significant first) of byte ``k // 8``, and each value is written least significant bit
    first. Widths that do not divide 8 straddle byte boundaries; the unused high bits of the last byte are
    zero. Signed values are stored in two's complement, except ``bits=1, signed=True``: binary weights
    ``{-1, +1}`` are stored as one bit each (``-1 -> 0``, ``+1 -> 1``). Example, 3-bit unsigned
    ``[1, 2, 3]`` -> ``1 | 2 << 3 | 3 << 6 = 209`` and a second byte ``0``:

    >>> import torch
    >>> pack_bits(torch.tensor([1, 2, 3]), bits=3, signed=False)
    tensor([209,   0], dtype=torch.uint8)
    >>> unpack_bits(torch.tensor([209, 0], dtype=torch.uint8), bits=3, signed=False, numel=3)
    tensor([1, 2, 3], dtype=torch.uint8)

Value quantization + zero-run encoding (:func:`zero_run_encode`)
    The sparse storage of Deep Compression (Han et al., 2016) as summarized in the compression article:
    a flat stream of quantized values is stored as entries ``(value, run)``, where ``run`` is the number of
    zeros that precede ``value`` since the previous entry. ``run`` has ``run_bits`` bits, so it is at most
    ``max_run = 2**run_bits - 1``; a longer gap of zeros is bridged by *filler* entries ``(0, max_run)``,
    each standing for ``max_run + 1`` zeros (its run plus itself). Zeros after the last non-zero value are
    written with filler entries too (the last one ``(0, remaining - 1)``), so decoding is one uniform rule --
    "emit ``run`` zeros, then ``value``" -- and needs no length. The stored size is
    ``len(entries) * (bits + run_bits)`` bits (:func:`zero_run_size_bits`):

    >>> zero_run_encode(torch.tensor([0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0]), bits=2, run_bits=2)
    (tensor([3, 0, 1, 0]), tensor([2, 3, 1, 1]))

Base (entropy) encoding (:func:`base_encode_size_bits`)
    The value stream Huffman-coded: code lengths come from the value histogram
    (:func:`huffman_code_lengths`, the classic two-smallest merge with :mod:`heapq`), and the size is
    ``sum(count * length)`` plus the codebook a decoder needs for a canonical Huffman code:
    ``HUFFMAN_HEADER_BITS`` (a 32-bit symbol count) plus, per distinct symbol, its value (``bits``) and its
    code length (``HUFFMAN_LENGTH_FIELD_BITS`` = 8 bits).

Container file (:func:`save_packed` / :func:`load_packed`)
    A raw binary format whose size is exactly header + payload::

        b"LQPACK01"                      8 bytes magic (format version 1)
        header length                    8 bytes, unsigned little-endian
        JSON header (UTF-8)              names, shapes, bits, signedness, dtypes, offsets, byte counts
        payloads                         the raw bytes of every tensor, concatenated, no padding

    so ``file size == 16 + len(JSON header) + sum(tensor bytes)`` (:data:`PACKED_FILE_PREFIX_BYTES` = 16).
    Tensors are written in this machine's byte order, which the header records.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.validation import check_int

__all__ = [
    "HUFFMAN_HEADER_BITS",
    "HUFFMAN_LENGTH_FIELD_BITS",
    "PACKED_FILE_MAGIC",
    "PACKED_FILE_PREFIX_BYTES",
    "SPEC_ENTRY",
    "ModelSizeReport",
    "base_encode_size_bits",
    "huffman_code_lengths",
    "load_packed",
    "load_packed_model",
    "model_size_report",
    "pack_bits",
    "pack_codes",
    "pack_model",
    "pack_rows",
    "packed_num_bytes",
    "packed_rows_num_bytes",
    "save_packed",
    "save_packed_model",
    "unpack_bits",
    "unpack_codes",
    "unpack_rows",
    "zero_run_decode",
    "zero_run_encode",
    "zero_run_size_bits",
]

IntArray = Tensor | np.ndarray

PACK_MIN_BITS = 1
PACK_MAX_BITS = 8
#: Widest value field the size/encoding functions accept (they never pack, so codebook indices etc. fit).
ENCODE_MAX_BITS = 32
#: Codebook header of :func:`base_encode_size_bits`: the number of distinct symbols.
HUFFMAN_HEADER_BITS = 32
#: Codebook field per symbol holding its Huffman code length.
HUFFMAN_LENGTH_FIELD_BITS = 8
PACKED_FILE_MAGIC = b"LQPACK01"
#: Bytes before the JSON header: the magic and the 8-byte header length.
PACKED_FILE_PREFIX_BYTES = len(PACKED_FILE_MAGIC) + 8
_FORMAT_VERSION = 1
_REQUIRED_KEYS = ("packed", "bits", "signed", "shape")


# ----------------------------------------------------------------------------------------------- validation
def _check_pack_bits(bits: object) -> int:
    return check_int(
        "bits",
        bits,
        minimum=PACK_MIN_BITS,
        maximum=PACK_MAX_BITS,
        integral=True,
        fix="Dense packing covers 1..8 bits; store wider integers as int16/int32 tensors instead.",
    )


def _check_encode_bits(bits: object, argument: str = "bits") -> int:
    return check_int(
        argument,
        bits,
        minimum=1,
        maximum=ENCODE_MAX_BITS,
        integral=True,
        fix=f"Give the width of one stored field, 1..{ENCODE_MAX_BITS} bits.",
    )


def _as_int_tensor(values: IntArray, argument: str = "values") -> Tensor:
    """Flatten ``values`` (tensor or numpy array of an integer or bool dtype) to a 1-D tensor."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, Tensor):
        raise QuantizationConfigError(
            f"`{argument}` must be a torch.Tensor or numpy array of integers, got {type(values).__name__}. "
            "Quantize to integer codes first (e.g. torch.round(w / scale).to(torch.int32))."
        )
    if values.is_floating_point() or values.is_complex():
        raise QuantizationConfigError(
            f"`{argument}` must have an integer dtype, got {values.dtype}. "
            "Quantize to integer codes first (e.g. torch.round(w / scale).to(torch.int32))."
        )
    return values.reshape(-1)


def _value_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _check_range(flat: Tensor, bits: int, signed: bool, argument: str = "values", binary_pm1: bool = True) -> None:
    """Check codes fit ``bits``; with ``binary_pm1`` a signed 1-bit field means ``{-1, +1}``."""
    if flat.numel() == 0:
        return
    if bits == 1 and signed and binary_pm1:
        bad = flat[(flat != 1) & (flat != -1)]
        if bad.numel():
            raise QuantizationConfigError(
                f"`{argument}` must be -1 or +1 for bits=1, signed=True (binary weights), got {int(bad[0])}. "
                "Map zeros to -1 or +1, or use signed=False with values in {0, 1}."
            )
        return
    low, high = _value_range(bits, signed)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < low or hi > high:
        offending = lo if lo < low else hi
        raise QuantizationConfigError(
            f"`{argument}` must be integers in [{low}, {high}] for bits={bits}, signed={signed}, "
            f"got {offending}. Clamp the values to that range or use a larger `bits`."
        )


def _infer_signed(flat: Tensor, signed: bool | None) -> bool:
    if signed is not None:
        return bool(signed)
    return bool(flat.numel()) and int(flat.min()) < 0


# ------------------------------------------------------------------------------------------- dense packing
def packed_num_bytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``numel`` values of ``bits`` bits: ``ceil(numel * bits / 8)``.

    Args:
        numel: number of values (>= 0).
        bits: bits per value, 1..8.

    Returns:
        The exact packed size in bytes.

    >>> packed_num_bytes(10, 3)
    4
    """
    numel = check_int("numel", numel, minimum=0, integral=True, fix="Pass the number of packed values.")
    bits = _check_pack_bits(bits)
    return (numel * bits + 7) // 8


def pack_bits(values: IntArray, bits: int, signed: bool) -> Tensor:
    """Pack integer codes densely into bytes, ``bits`` bits per value (layout in the module docstring).

    Args:
        values: integer codes of any shape and integer dtype (flattened in row-major order). They must lie in
            ``[-2**(bits-1), 2**(bits-1) - 1]`` when ``signed`` and in ``[0, 2**bits - 1]`` otherwise; for
            ``bits=1, signed=True`` they must be ``-1`` or ``+1`` (binary weights, one bit each).
        bits: bits per value, 1..8.
        signed: whether the codes are signed (two's complement; ``{-1, +1}`` for one bit).

    Returns:
        A flat ``uint8`` tensor of exactly :func:`packed_num_bytes` ``(values.numel(), bits)`` bytes, on the
        device of ``values``.

    Raises:
        QuantizationConfigError: ``bits`` outside 1..8, a non-integer dtype, or a value outside the range.
    """
    bits = _check_pack_bits(bits)
    flat = _as_int_tensor(values)
    _check_range(flat, bits, signed)
    n = flat.numel()
    codes = flat.to(torch.int64)
    if bits == 1 and signed:
        codes = (codes + 1) // 2  # -1 -> 0, +1 -> 1
    elif signed:
        codes = codes & ((1 << bits) - 1)  # two's complement in `bits` bits
    codes = codes.to(torch.uint8)  # every code is now in [0, 2**bits - 1]; uint8 shifts are the fast path
    if bits == 8:
        return codes
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)  # LSB first, value by value
    n_bytes = (n * bits + 7) // 8
    padded = torch.zeros(n_bytes * 8, dtype=torch.uint8, device=codes.device)
    padded[: stream.numel()] = stream
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=codes.device)
    return (padded.reshape(n_bytes, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, signed: bool, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: exact round trip of the codes (flat; reshape to the layer's shape).

    Args:
        packed: the flat ``uint8`` tensor from :func:`pack_bits`, exactly
            :func:`packed_num_bytes` ``(numel, bits)`` bytes long.
        bits: bits per value used when packing, 1..8.
        signed: signedness used when packing.
        numel: number of values packed.

    Returns:
        A flat tensor of ``numel`` codes: ``int8`` when ``signed`` (``{-1, +1}`` for one bit), ``uint8``
        otherwise, on the device of ``packed``.

    Raises:
        QuantizationConfigError: bad ``bits`` / ``numel``, or ``packed`` not ``uint8`` of the right length.
    """
    bits = _check_pack_bits(bits)
    numel = check_int("numel", numel, minimum=0, integral=True, fix="Pass the number of values that were packed.")
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
        raise QuantizationConfigError(
            f"`packed` must be a uint8 torch.Tensor from pack_bits, got {got}. Pass pack_bits' output."
        )
    expected = (numel * bits + 7) // 8
    if packed.numel() != expected:
        raise QuantizationConfigError(
            f"`packed` must hold ceil(numel * bits / 8) = {expected} bytes for numel={numel}, bits={bits}, "
            f"got {packed.numel()}. Pass the same `numel` and `bits` that were used to pack."
        )
    flat = packed.reshape(-1)
    out_dtype = torch.int8 if signed else torch.uint8
    if bits == 8:
        return flat.view(torch.int8).clone() if signed else flat.clone()
    byte_shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: numel * bits]
    weights = torch.tensor([1 << k for k in range(bits)], dtype=torch.int16, device=flat.device)
    codes = (stream.reshape(numel, bits).to(torch.int16) * weights).sum(dim=1, dtype=torch.int16)
    if bits == 1 and signed:
        codes = codes * 2 - 1
    elif signed:
        codes = torch.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)
    return codes.to(out_dtype)


def _row_widths(row_bits: object, rows: int, argument: str = "row_bits") -> list[int]:
    if isinstance(row_bits, (str, bytes)) or not isinstance(row_bits, (list, tuple)) or len(row_bits) != rows:
        raise QuantizationConfigError(
            f"`{argument}` must give one width per row ({rows} rows), got {row_bits!r}. Pass a list of {rows} ints."
        )
    return [_check_pack_bits(b) for b in row_bits]


def packed_rows_num_bytes(shape: tuple[int, ...] | list[int], row_bits: list[int] | tuple[int, ...]) -> int:
    """Bytes that :func:`pack_rows` uses: ``ceil(sum(row_bits) * numel_per_row / 8)``."""
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (sum(row_bits) * per_row + 7) // 8


def pack_rows(values: IntArray, row_bits: list[int] | tuple[int, ...], signed: bool) -> Tensor:
    """Pack codes with one width per row (per output channel: per-channel bit widths) into one bit stream.

    Rows (slices along dimension 0) follow each other, each value at its row's width, in the layout of
    :func:`pack_bits` (which this equals when every row has the same width): ``ceil(sum(row_bits) * n / 8)`` bytes
    for rows of ``n`` values. Signed one-bit rows hold ``{-1, +1}``.

    >>> packed = pack_rows(torch.tensor([[1, -1], [3, -4]]), [1, 3], signed=True)
    >>> packed.numel(), unpack_rows(packed, [1, 3], True, (2, 2)).tolist()
    (1, [[1, -1], [3, -4]])
    """
    tensor = values if isinstance(values, Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    if tensor.dim() == 0:
        raise QuantizationConfigError("`values` must have a row dimension (dimension 0).")
    widths_list = _row_widths(row_bits, tensor.shape[0])
    rows = _as_int_tensor(tensor).reshape(tensor.shape[0], -1).to(torch.int64)
    per_row = rows.shape[1]
    unsigned = torch.empty_like(rows)
    for width in sorted(set(widths_list)):
        idx = torch.tensor([r for r, w in enumerate(widths_list) if w == width], device=rows.device)
        part = rows.index_select(0, idx)
        _check_range(part.reshape(-1), width, signed)
        if width == 1 and signed:
            part = (part + 1) // 2
        elif signed:
            part = part & ((1 << width) - 1)
        unsigned[idx] = part
    widths = torch.tensor(widths_list, device=rows.device).repeat_interleave(per_row)
    flat = unsigned.reshape(-1)
    offsets = torch.cumsum(widths, 0) - widths
    total = int(widths.sum())
    n_bytes = (total + 7) // 8
    stream = torch.zeros(n_bytes * 8, dtype=torch.uint8, device=rows.device)
    for bit in range(max(widths_list, default=0)):
        sel = widths > bit
        stream[offsets[sel] + bit] = ((flat[sel] >> bit) & 1).to(torch.uint8)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=rows.device)
    return (stream.reshape(n_bytes, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_rows(packed: Tensor, row_bits: list[int] | tuple[int, ...], signed: bool, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_rows`: the codes in ``shape`` (``int16``)."""
    shape = tuple(int(d) for d in shape)
    widths_list = _row_widths(row_bits, shape[0] if shape else 0)
    expected = packed_rows_num_bytes(shape, widths_list)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.numel() != expected:
        got = f"{packed.numel()} bytes of {packed.dtype}" if isinstance(packed, Tensor) else type(packed).__name__
        raise QuantizationConfigError(
            f"`packed` must be {expected} uint8 bytes for shape {shape} at row_bits {widths_list[:8]}..., got {got}. "
            "Pass pack_rows' output with the same shape and widths."
        )
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    flat = packed.reshape(-1)
    byte_shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> byte_shifts) & 1).reshape(-1).to(torch.int64)
    widths = torch.tensor(widths_list, device=flat.device).repeat_interleave(per_row)
    offsets = torch.cumsum(widths, 0) - widths
    codes = torch.zeros(widths.numel(), dtype=torch.int64, device=flat.device)
    for bit in range(max(widths_list, default=0)):
        sel = widths > bit
        codes[sel] |= stream[offsets[sel] + bit] << bit
    if signed:
        binary = widths == 1
        half = 1 << (widths - 1)
        codes = torch.where(binary, codes * 2 - 1, torch.where(codes >= half, codes - (1 << widths), codes))
    return codes.to(torch.int16).reshape(shape)


# ---------------------------------------------------------------------------------------- zero-run coding
def zero_run_encode(
    values: IntArray, bits: int, run_bits: int = 4, signed: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Zero-run encode a flat stream of integer codes (Deep Compression's sparse format; see module docs).

    Args:
        values: integer codes of any shape (flattened in row-major order).
        bits: width of the stored value field (1..32); the codes must fit in it.
        run_bits: width of the stored run field (1..32); runs are at most ``2**run_bits - 1``.
        signed: whether the value field is two's complement (``[-2**(bits-1), 2**(bits-1) - 1]``) or
            unsigned (``[0, 2**bits - 1]``); ``None`` infers signed when any value is negative. The
            ``{-1, +1}`` one-bit convention of :func:`pack_bits` does not apply here (the filler value 0
            must be representable).

    Returns:
        ``(entry_values, runs)``: two 1-D tensors of equal length. ``entry_values`` keeps the dtype of
        ``values`` and holds the non-zero values and the filler zeros in order; ``runs`` (``int64``) holds
        the number of zeros before each entry.

    Raises:
        QuantizationConfigError: bad ``bits`` / ``run_bits``, a non-integer dtype or a value out of range.
    """
    bits = _check_encode_bits(bits)
    run_bits = _check_encode_bits(run_bits, "run_bits")
    flat = _as_int_tensor(values)
    is_signed = _infer_signed(flat, signed)
    _check_range(flat, bits, is_signed, binary_pm1=False)
    device = flat.device
    max_run = (1 << run_bits) - 1
    period = max_run + 1  # zeros covered by one filler entry (its run plus itself)
    n = flat.numel()
    nz_idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
    prev = torch.cat([torch.tensor([-1], device=device), nz_idx[:-1]]) if nz_idx.numel() else nz_idx
    gaps = nz_idx - prev - 1
    fillers = torch.div(gaps, period, rounding_mode="floor")
    last_runs = gaps - fillers * period
    # Each non-zero k becomes `fillers[k]` entries (0, max_run) followed by (value_k, last_runs[k]).
    group_sizes = fillers + 1
    total = int(group_sizes.sum()) if nz_idx.numel() else 0
    ends = torch.cumsum(group_sizes, 0) - 1  # entry index of each non-zero value
    entry_values = torch.zeros(total, dtype=flat.dtype, device=device)
    entry_values[ends] = flat[nz_idx]
    runs = torch.full((total,), max_run, dtype=torch.int64, device=device)
    runs[ends] = last_runs
    # Trailing zeros: full fillers, then one (0, remainder - 1) for a partial period.
    trailing = n - (int(nz_idx[-1]) + 1 if nz_idx.numel() else 0)
    full, remainder = divmod(trailing, period)
    tail_runs = torch.full((full + (remainder > 0),), max_run, dtype=torch.int64, device=device)
    if remainder:
        tail_runs[-1] = remainder - 1
    entry_values = torch.cat([entry_values, torch.zeros(tail_runs.numel(), dtype=flat.dtype, device=device)])
    runs = torch.cat([runs, tail_runs])
    return entry_values, runs


def zero_run_decode(entry_values: IntArray, runs: IntArray, run_bits: int | None = None) -> Tensor:
    """Inverse of :func:`zero_run_encode`: for every entry emit ``run`` zeros, then its value.

    Args:
        entry_values: the entry values (non-zero values and filler zeros).
        runs: the zero-run length before each entry, same length as ``entry_values``.
        run_bits: when given, check that every run fits in ``run_bits`` bits.

    Returns:
        The flat decoded stream, with the dtype of ``entry_values``.

    Raises:
        QuantizationConfigError: mismatched lengths, negative runs or runs wider than ``run_bits``.
    """
    vals = _as_int_tensor(entry_values, "entry_values")
    run = _as_int_tensor(runs, "runs").to(torch.int64)
    if vals.numel() != run.numel():
        raise QuantizationConfigError(
            f"`entry_values` and `runs` must have the same length, got {vals.numel()} and {run.numel()}. "
            "Pass both outputs of zero_run_encode unchanged."
        )
    if run.numel() == 0:
        return vals.clone()
    high = (1 << _check_encode_bits(run_bits, "run_bits")) - 1 if run_bits is not None else None
    lo, hi = int(run.min()), int(run.max())
    if lo < 0 or (high is not None and hi > high):
        offending = lo if lo < 0 else hi
        bound = f"in [0, {high}]" if high is not None else ">= 0"
        raise QuantizationConfigError(
            f"`runs` must be {bound}, got {offending}. Pass the runs of zero_run_encode with the same run_bits."
        )
    positions = torch.cumsum(run + 1, 0) - 1  # index of each entry in the decoded stream
    out = torch.zeros(int(positions[-1]) + 1, dtype=vals.dtype, device=vals.device)
    out[positions.to(vals.device)] = vals
    return out


def zero_run_size_bits(values: IntArray, bits: int, run_bits: int = 4, signed: bool | None = None) -> int:
    """Stored size in bits of :func:`zero_run_encode`'s output: ``entries * (bits + run_bits)``.

    Args:
        values: integer codes of any shape.
        bits: width of the value field (1..32).
        run_bits: width of the run field (1..32).
        signed: as in :func:`zero_run_encode`.

    Returns:
        The size in bits (the tensor's shape is metadata, not counted).
    """
    entry_values, _ = zero_run_encode(values, bits, run_bits, signed)
    return entry_values.numel() * (int(bits) + int(run_bits))


# --------------------------------------------------------------------------------------------- Huffman
def huffman_code_lengths(counts: dict[int, int]) -> dict[int, int]:
    """Huffman code length per symbol, from a histogram (two smallest weights merged first, via heapq).

    Ties are broken deterministically (leaves in ascending symbol order, then merged nodes in creation order).
    Symbols with a zero count get no code. A single symbol gets length 1 (one bit per occurrence, so the
    stream stays decodable); with two or more symbols the lengths satisfy Kraft's equality
    ``sum(2**-length) == 1``.

    Args:
        counts: occurrences per symbol (non-negative integers).

    Returns:
        ``{symbol: code length in bits}`` for every symbol with a positive count.

    Raises:
        QuantizationConfigError: a negative or non-integer count.

    >>> huffman_code_lengths({0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5})  # CLRS 16.3
    {0: 1, 1: 3, 2: 3, 3: 3, 4: 4, 5: 4}
    """
    symbols = []
    for symbol, count in sorted(counts.items()):
        count = check_int(
            f"counts[{symbol!r}]", count, minimum=0, integral=True, fix="Counts are occurrences per symbol."
        )
        if count > 0:
            symbols.append((symbol, count))
    if not symbols:
        return {}
    if len(symbols) == 1:
        return {symbols[0][0]: 1}
    parent: list[int] = [-1] * (2 * len(symbols) - 1)
    heap = [(count, node) for node, (_, count) in enumerate(symbols)]
    heapq.heapify(heap)
    next_node = len(symbols)
    while len(heap) > 1:
        count_a, node_a = heapq.heappop(heap)
        count_b, node_b = heapq.heappop(heap)
        parent[node_a] = parent[node_b] = next_node
        heapq.heappush(heap, (count_a + count_b, next_node))
        next_node += 1
    # Internal nodes are created after their children, so depths resolve root-down in reverse order.
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):
        depth[node] = depth[parent[node]] + 1
    return {symbol: depth[node] for node, (symbol, _) in enumerate(symbols)}


def base_encode_size_bits(values: IntArray, bits: int, signed: bool | None = None) -> int:
    """Huffman-coded size in bits of a value stream, codebook included (see module docstring).

    Size = ``sum(count * code_length)`` + ``HUFFMAN_HEADER_BITS`` + ``n_symbols * (bits +
    HUFFMAN_LENGTH_FIELD_BITS)``.

    Args:
        values: integer codes of any shape.
        bits: width of one symbol in the codebook (1..32); the codes must fit in it.
        signed: two's complement (``True``) or unsigned value range; ``None`` infers signed when any value
            is negative.

    Returns:
        The total size in bits.
    """
    bits = _check_encode_bits(bits)
    flat = _as_int_tensor(values)
    is_signed = _infer_signed(flat, signed)
    _check_range(flat, bits, is_signed)  # a signed 1-bit field holds binary codes {-1, +1}
    symbols, counts = torch.unique(flat, return_counts=True)
    histogram = dict(zip(symbols.tolist(), counts.tolist(), strict=True))
    lengths = huffman_code_lengths(histogram)
    payload = sum(histogram[s] * length for s, length in lengths.items())
    return payload + HUFFMAN_HEADER_BITS + len(lengths) * (bits + HUFFMAN_LENGTH_FIELD_BITS)


# ------------------------------------------------------------------------------------------ container file
def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise QuantizationConfigError(f"Unknown dtype {name!r} in a packed file header. The file is corrupt.")
    return dtype


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def save_packed(path: str | os.PathLike[str], tensors: dict[str, dict[str, Any]]) -> int:
    """Write packed tensors to one raw binary file (format in the module docstring).

    Args:
        path: the file to write (overwritten).
        tensors: ``{name: entry}``. Every entry needs ``"packed"`` (flat ``uint8`` tensor from
            :func:`pack_bits`), ``"bits"`` (1..8), ``"signed"`` (bool) and ``"shape"`` (the unpacked
            shape). Any other key may hold a tensor (stored raw with its dtype and shape, e.g. ``"scale"``,
            ``"zero_point"``, a codebook), ``None``, or a JSON scalar (``int``/``float``/``bool``/``str``).

    Returns:
        The number of bytes written: ``PACKED_FILE_PREFIX_BYTES + header bytes + payload bytes``.

    Raises:
        QuantizationConfigError: a missing key, a packed length that does not match shape and bits, or a
            value that cannot be stored.
    """
    if not isinstance(tensors, dict):
        raise QuantizationConfigError(
            f"`tensors` must be a dict {{name: entry}}, got {type(tensors).__name__}. Wrap entries in a dict."
        )
    header: dict[str, Any] = {"version": _FORMAT_VERSION, "byteorder": sys.byteorder, "tensors": {}}
    payloads: list[bytes] = []
    offset = 0
    for name, entry in tensors.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise QuantizationConfigError(
                f"`tensors` must map str names to dict entries, got {name!r}: {type(entry).__name__}. "
                'Pass {"layer.weight": {"packed": ..., "bits": ..., "signed": ..., "shape": ...}}.'
            )
        missing = [key for key in _REQUIRED_KEYS if key not in entry]
        if missing:
            raise QuantizationConfigError(
                f"`tensors[{name!r}]` is missing {missing}. Every entry needs {list(_REQUIRED_KEYS)}."
            )
        shape = [
            check_int(f"tensors[{name!r}]['shape']", d, minimum=0, integral=True, fix="Give the unpacked shape.")
            for d in entry["shape"]
        ]
        numel = math.prod(shape)
        if isinstance(entry["bits"], (list, tuple)):  # one width per row (pack_rows)
            bits: int | list[int] = _row_widths(entry["bits"], shape[0] if shape else 0, f"tensors[{name!r}]['bits']")
            expected = packed_rows_num_bytes(shape, bits)
        else:
            bits = _check_pack_bits(entry["bits"])
            expected = packed_num_bytes(numel, bits)
        packed = entry["packed"]
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
            raise QuantizationConfigError(
                f"`tensors[{name!r}]['packed']` must be a flat uint8 tensor from pack_bits, got "
                f"{getattr(packed, 'dtype', type(packed).__name__)}. Pass pack_bits' output."
            )
        if packed.numel() != expected:
            raise QuantizationConfigError(
                f"`tensors[{name!r}]['packed']` has {packed.numel()} bytes, but shape {tuple(shape)} at "
                f"bits={bits} packs into {expected}. Pass the shape and bits used to pack."
            )
        meta: dict[str, Any] = {"bits": bits, "signed": bool(entry["signed"]), "shape": shape}
        fields: dict[str, Any] = {}
        tensor_fields: dict[str, Any] = {}
        for key, value in entry.items():
            if key in ("bits", "signed", "shape"):
                continue
            if isinstance(value, Tensor):
                data = _tensor_bytes(value)
                tensor_fields[key] = {
                    "dtype": str(value.dtype),
                    "shape": list(value.shape),
                    "offset": offset,
                    "nbytes": len(data),
                }
                payloads.append(data)
                offset += len(data)
            elif value is None or isinstance(value, (bool, int, float, str)):
                fields[key] = value
            else:
                raise QuantizationConfigError(
                    f"`tensors[{name!r}][{key!r}]` must be a tensor, None, or an int/float/bool/str, got "
                    f"{type(value).__name__}. Convert it to a tensor."
                )
        meta["tensors"] = tensor_fields
        meta["fields"] = fields
        header["tensors"][name] = meta
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    with open(path, "wb") as handle:
        handle.write(PACKED_FILE_MAGIC)
        handle.write(len(header_bytes).to_bytes(8, "little"))
        handle.write(header_bytes)
        for data in payloads:
            handle.write(data)
    return PACKED_FILE_PREFIX_BYTES + len(header_bytes) + offset


def load_packed(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a file written by :func:`save_packed`.

    Args:
        path: the file to read.

    Returns:
        ``{name: entry}`` with the same keys and values that were saved; ``"shape"`` comes back as a tuple
        and tensors come back on the CPU.

    Raises:
        QuantizationConfigError: the file is not a packed file, is truncated, or was written with another
            byte order.
    """
    with open(path, "rb") as handle:
        blob = handle.read()
    if blob[: len(PACKED_FILE_MAGIC)] != PACKED_FILE_MAGIC or len(blob) < PACKED_FILE_PREFIX_BYTES:
        raise QuantizationConfigError(
            f"`path` {os.fspath(path)!r} is not a lightning-quant packed file (magic {PACKED_FILE_MAGIC!r} "
            "missing). Write it with save_packed."
        )
    header_len = int.from_bytes(blob[len(PACKED_FILE_MAGIC) : PACKED_FILE_PREFIX_BYTES], "little")
    payload_start = PACKED_FILE_PREFIX_BYTES + header_len
    header = json.loads(blob[PACKED_FILE_PREFIX_BYTES:payload_start].decode("utf-8"))
    if header.get("byteorder") != sys.byteorder:
        raise QuantizationConfigError(
            f"`path` {os.fspath(path)!r} was written on a {header.get('byteorder')}-endian machine; this one "
            f"is {sys.byteorder}-endian. Load it on a machine with the same byte order."
        )
    result: dict[str, dict[str, Any]] = {}
    for name, meta in header["tensors"].items():
        entry: dict[str, Any] = {"bits": meta["bits"], "signed": meta["signed"], "shape": tuple(meta["shape"])}
        for key, spec in meta["tensors"].items():
            start = payload_start + spec["offset"]
            end = start + spec["nbytes"]
            if end > len(blob):
                raise QuantizationConfigError(
                    f"`path` {os.fspath(path)!r} is truncated: {name}.{key} needs bytes up to {end}, the file "
                    f"has {len(blob)}. Write it again with save_packed."
                )
            dtype = _dtype_from_name(spec["dtype"])
            if spec["nbytes"] == 0:
                tensor = torch.empty(spec["shape"], dtype=dtype)
            else:
                raw = torch.frombuffer(bytearray(blob[start:end]), dtype=torch.uint8)
                tensor = raw.view(dtype).reshape(spec["shape"])
            entry[key] = tensor
        entry.update(meta["fields"])
        result[name] = entry
    return result


# ------------------------------------------------------------------------------------------ whole models
#: entry of :func:`pack_model` that holds the model's quantization recipe (``QuantSpec`` JSON)
SPEC_ENTRY = "__lightning_quant_spec__"


def _empty_entry(**extra: Any) -> dict[str, Any]:
    """An entry with no packed payload (a float tensor, quantizer parameters, the recipe)."""
    return {"packed": torch.zeros(0, dtype=torch.uint8), "bits": 8, "signed": False, "shape": (0,), **extra}


def _quantized_parts(model: torch.nn.Module) -> tuple[dict[str, Any], set[str]]:
    """The quantized layers and the state-dict keys that packing replaces (weights, quantizer state)."""
    from lightning_quant.surgery.layers import quantized_layers, quantizers  # export sits above surgery

    layers = quantized_layers(model)
    replaced = set()
    for name, module in quantizers(model).items():
        replaced.update(f"{name}.{key}" for key, _ in module.state_dict().items())
    replaced.update(f"{name}.{param}" for name, layer in layers.items() for param, _, _ in layer.quantized_parameters())
    return layers, replaced


def _quantized_weights(layers: dict[str, Any]) -> list[tuple[str, str, Tensor, Any]]:
    """``(layer name, state-dict key, Parameter, quantizer)`` of every quantized Parameter of ``layers``."""
    return [
        (name, f"{name}.{param_name}", param, quantizer)
        for name, layer in layers.items()
        for param_name, param, quantizer in layer.quantized_parameters()
    ]


def pack_codes(codes: Tensor, widths: Tensor, signed: bool) -> tuple[Tensor, int | list[int]]:
    """Pack a quantizer's codes at their widths (``Quantizer.code_widths``): ``(packed bytes, bits)`` where
    ``bits`` is one int, or one width per row for per-channel widths."""
    if widths.dim() == 0 or widths.numel() == 1:
        bits = int(widths.reshape(-1)[0])
        return pack_bits(codes.cpu(), bits, signed), bits
    row_bits = [int(w) for w in widths.reshape(-1).tolist()]
    return pack_rows(codes.cpu(), row_bits, signed), row_bits


def unpack_codes(packed: Tensor, bits: int | list[int], signed: bool, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_codes`: the codes in ``shape``."""
    if isinstance(bits, (list, tuple)):
        return unpack_rows(packed, list(bits), signed, shape)
    return unpack_bits(packed, bits, signed, math.prod(shape)).reshape(shape)


def _pack_side(entry: dict[str, Any], side: dict[str, tuple[Tensor, int]]) -> None:
    """Store a quantizer's side tensors in ``entry``: float ones raw (float32), integer ones packed at their bits."""
    for key, (tensor, bits) in side.items():
        if tensor.is_floating_point():
            entry[key] = tensor.detach().float().cpu().clone()
        else:
            entry[key] = pack_bits(tensor.cpu(), bits, signed=True)
            entry[f"{key}__bits"] = int(bits)
            entry[f"{key}__shape"] = ",".join(str(d) for d in tensor.shape)


def _unpack_side(entry: dict[str, Any]) -> dict[str, Tensor]:
    side = {}
    for key, value in entry.items():
        if not isinstance(value, Tensor) or key == "packed" or key.endswith("__bits"):
            continue
        if f"{key}__bits" in entry:
            shape = tuple(int(d) for d in str(entry[f"{key}__shape"]).split(",") if d)
            side[key] = unpack_bits(value, entry[f"{key}__bits"], True, math.prod(shape)).reshape(shape)
        else:
            side[key] = value
    return side


def _side_bytes(entry: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for k, v in entry.items() if isinstance(v, Tensor) and k != "packed")


@torch.no_grad()
def pack_model(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Every tensor a quantized model needs, with its weights packed into their bit widths.

    Entries (the format of :func:`save_packed`):

    * ``<layer>.<parameter>`` (the quantized Parameter's state-dict key, e.g. ``conv1.weight``): the quantizer's
      codes (``int_repr``: integers on a uniform grid, codebook indices) packed at their storage widths (binary:
      1 bit; per-channel widths: one width per output channel, one bit stream), with the quantizer's side tensors
      (``scale``/``zero_point``, or the codebook packed at its bits and its scale), the quantizer kind and
      ``ch_axis``.
    * ``<layer>.input_quantizer`` (and every other activation quantizer by its module name, e.g. a residual
      ``<bn>.output_quantizer``): the activation step size and zero point (no payload), ``bits``.
    * every other floating-point tensor of the state dict (biases, BatchNorm, float layers), stored raw under
      its state-dict key with ``kind="float"``.
    * :data:`SPEC_ENTRY`: the ``QuantSpec`` JSON, so :func:`load_packed_model` can quantize a fresh model.

    Observer statistics and integer bookkeeping buffers are not stored (they do not change the outputs).

    Raises:
        QuantizationConfigError: ``model`` has no quantized layer, or a codebook layer is still mid-way through
            incremental quantization (some weights in float).
    """
    from lightning_quant.surgery.layers import activation_quantizers
    from lightning_quant.surgery.spec import QuantSpec

    spec = QuantSpec.from_model(model)  # raises a clear error for a float model
    layers, replaced = _quantized_parts(model)
    entries: dict[str, dict[str, Any]] = {SPEC_ENTRY: _empty_entry(kind="spec", spec=spec.to_json())}
    for name, key, weight, quantizer in _quantized_weights(layers):
        if getattr(quantizer, "complete", True) is False:
            raise QuantizationConfigError(
                f"Layer {name!r} is mid-way through incremental quantization: some of its weights are still float, "
                "so it has no packed form yet. HINT: pack after the last stage (every codebook entry frozen)."
            )
        codes = quantizer.int_repr(weight)
        packed, bits = pack_codes(codes, quantizer.code_widths(codes), quantizer.signed_codes)
        entry = {
            "packed": packed,
            "bits": bits,
            "signed": quantizer.signed_codes,
            "shape": tuple(codes.shape),
            "ch_axis": getattr(quantizer, "ch_axis", None),
            "quantizer": quantizer.KIND,
            "kind": "weight",
        }
        _pack_side(entry, quantizer.side_tensors())
        entries[key] = entry
    for name, act in activation_quantizers(model).items():
        entries[name] = _empty_entry(
            kind="activation",
            act_bits=act.bits,
            scale=act.effective_scale().detach().float().cpu().clone(),
            zero_point=act.zero_point.detach().float().cpu().clone(),
        )
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in replaced or not tensor.is_floating_point() or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entries[key] = _empty_entry(kind="float", value=tensor.detach().cpu().clone())
    return entries


def save_packed_model(model: torch.nn.Module, path: str | os.PathLike[str]) -> int:
    """Write :func:`pack_model` ``(model)`` with :func:`save_packed`; returns the bytes written."""
    return save_packed(path, pack_model(model))


@torch.no_grad()
def load_packed_model(model: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a file of :func:`save_packed_model` into a fresh model (float, or quantized with the same recipe).

    A float model is first quantized with the stored recipe. Each weight quantizer restores its state from the
    codes and side tensors (``Quantizer.load_codes``) and the weight becomes the values its codes stand for, so the
    fake-quant outputs are exactly those of the saved model (eval mode).

    Raises:
        QuantizationConfigError: the file is not a packed model, or it does not fit ``model``.
    """
    from lightning_quant.surgery.layers import activation_quantizers
    from lightning_quant.surgery.quantize import is_quantized, quantize_model
    from lightning_quant.surgery.spec import QuantSpec

    entries = load_packed(path)
    if SPEC_ENTRY not in entries:
        raise QuantizationConfigError(
            f"`path` {os.fspath(path)!r} holds packed tensors but no model recipe. Write it with save_packed_model."
        )
    if not is_quantized(model):
        quantize_model(model, QuantSpec.from_json(entries[SPEC_ENTRY]["spec"]))
    layers, _ = _quantized_parts(model)
    weights = {k: e for k, e in entries.items() if e.get("kind") == "weight"}
    expected_weights = {key: (weight, quantizer) for _, key, weight, quantizer in _quantized_weights(layers)}
    if set(weights) != set(expected_weights):
        raise QuantizationConfigError(
            f"The packed file's quantized weights {sorted(weights)[:6]} do not match the model's "
            f"{sorted(expected_weights)[:6]}. Load it into the model it was saved from."
        )
    for key, (weight, quantizer) in expected_weights.items():
        entry = weights[key]
        kind = entry.get("quantizer", "uniform")
        if kind != quantizer.KIND:
            raise QuantizationConfigError(
                f"`{key}` was packed by a {kind!r} quantizer, the model's is {quantizer.KIND!r}. Load it into "
                "the model it was saved from."
            )
        expected = tuple(quantizer.int_repr(weight).shape)
        if tuple(entry["shape"]) != expected:
            raise QuantizationConfigError(
                f"`{key}` has codes of shape {expected} in the model, {tuple(entry['shape'])} in the file."
            )
        if quantizer.WIDTH_SETTABLE:
            quantizer.bits = tuple(entry["bits"]) if isinstance(entry["bits"], list) else entry["bits"]
        codes = unpack_codes(entry["packed"], entry["bits"], entry["signed"], tuple(entry["shape"]))
        quantizer.load_codes(codes, _unpack_side(entry))
        weight.copy_(quantizer.dequantize(codes).to(weight))
    acts = activation_quantizers(model)
    for key, entry in entries.items():
        if entry.get("kind") != "activation":
            continue
        if key not in acts:
            raise QuantizationConfigError(
                f"The packed file has the activation quantizer {key!r}, which the model does not. Load it into "
                "the model it was saved from."
            )
        acts[key].bits = entry["act_bits"]
        acts[key].load_codes(torch.zeros(0), {"scale": entry["scale"], "zero_point": entry["zero_point"]})
    state = model.state_dict(keep_vars=True)
    for key, entry in entries.items():
        if entry.get("kind") != "float":
            continue
        if key not in state:
            raise QuantizationConfigError(
                f"The packed file has {key!r}, which the model does not. Load it into the model it was saved from."
            )
        state[key].data.copy_(entry["value"])
    return model


@dataclass(frozen=True)
class ModelSizeReport:
    """A quantized model's real size in bytes, next to float32 (see :func:`model_size_report`)."""

    fp32_bytes: int
    weight_bytes: int  # packed weight codes (integers on a grid, codebook indices)
    scale_bytes: int  # side tensors: step sizes and zero points (weights and activations), codebooks
    float_bytes: int  # every other floating-point tensor (biases, BatchNorm, float layers)
    zero_run_bytes: int | None = None  # the weights zero-run encoded instead of densely packed
    huffman_bytes: int | None = None  # the weights Huffman coded instead of densely packed

    @property
    def total_bytes(self) -> int:
        """Packed weights + scales + float tensors: the payload of :func:`save_packed_model`'s file."""
        return self.weight_bytes + self.scale_bytes + self.float_bytes

    @property
    def compression(self) -> float:
        """fp32 size over the packed size."""
        return self.fp32_bytes / max(self.total_bytes, 1)

    def __str__(self) -> str:
        lines = [
            f"fp32 {self.fp32_bytes / 1024:.1f} KiB -> packed {self.total_bytes / 1024:.1f} KiB "
            f"({self.compression:.2f}x): weights {self.weight_bytes / 1024:.1f} KiB, scales "
            f"{self.scale_bytes / 1024:.2f} KiB, float tensors {self.float_bytes / 1024:.1f} KiB"
        ]
        rest = self.scale_bytes + self.float_bytes
        if self.zero_run_bytes is not None:
            lines.append(f"with zero-run encoded weights: {(self.zero_run_bytes + rest) / 1024:.1f} KiB")
        if self.huffman_bytes is not None:
            lines.append(f"with Huffman-coded weights: {(self.huffman_bytes + rest) / 1024:.1f} KiB")
        return "\n".join(lines)


@torch.no_grad()
def model_size_report(model: torch.nn.Module, *, encodings: bool = False, run_bits: int = 4) -> ModelSizeReport:
    """The size of :func:`pack_model` ``(model)`` by part, next to the float32 model.

    ``total_bytes`` is the payload of the file :func:`save_packed_model` writes (the file adds
    ``PACKED_FILE_PREFIX_BYTES`` and its JSON header), and agrees with
    :func:`lightning_quant.surgery.quantization_summary` ``.quantized_bits / 8`` up to the rounding of each
    packed weight tensor to whole bytes.

    Args:
        model: a quantized model.
        encodings: also compute the zero-run (``run_bits`` run field) and Huffman sizes of the weights.
        run_bits: run-field width of the zero-run encoding.
    """
    entries = pack_model(model)
    weight_bytes = scale_bytes = float_bytes = 0
    zero_run_bits = huffman_bits = 0
    fp32_bytes = 0
    params = {key: weight for _, key, weight, _ in _quantized_weights(_quantized_parts(model)[0])}
    for key, entry in entries.items():
        kind = entry.get("kind")
        if kind == "weight":
            weight_bytes += entry["packed"].numel()
            scale_bytes += _side_bytes(entry)
            fp32_bytes += 4 * params[key].numel()
            if encodings:
                codes = unpack_codes(entry["packed"], entry["bits"], entry["signed"], tuple(entry["shape"]))
                row_bits = entry["bits"] if isinstance(entry["bits"], list) else [entry["bits"]] * codes.shape[0]
                for width in sorted(set(row_bits)):  # each width group is encoded with its own field width
                    group = codes.reshape(codes.shape[0], -1)[[r for r, w in enumerate(row_bits) if w == width]]
                    if width == 1:  # binary weights have no zeros to skip: stored densely
                        zero_run_bits += group.numel()
                    else:
                        zero_run_bits += zero_run_size_bits(group, width, run_bits, signed=entry["signed"])
                    huffman_bits += base_encode_size_bits(group, width, signed=entry["signed"])
        elif kind == "activation":
            scale_bytes += 4 * (entry["scale"].numel() + entry["zero_point"].numel())
        elif kind == "float":
            size = entry["value"].numel() * entry["value"].element_size()
            float_bytes += size
            fp32_bytes += 4 * entry["value"].numel()
    return ModelSizeReport(
        fp32_bytes=fp32_bytes,
        weight_bytes=weight_bytes,
        scale_bytes=scale_bytes,
        float_bytes=float_bytes,
        zero_run_bytes=(zero_run_bits + 7) // 8 if encodings else None,
        huffman_bytes=(huffman_bits + 7) // 8 if encodings else None,
    )
