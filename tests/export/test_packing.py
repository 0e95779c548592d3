"""Tests of lightning_quant.export.packing: bit-exact packing, zero-run and Huffman sizes, the container file."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.export.packing import (
    HUFFMAN_HEADER_BITS,
    HUFFMAN_LENGTH_FIELD_BITS,
    PACKED_FILE_MAGIC,
    PACKED_FILE_PREFIX_BYTES,
    base_encode_size_bits,
    huffman_code_lengths,
    load_packed,
    pack_bits,
    packed_num_bytes,
    save_packed,
    unpack_bits,
    zero_run_decode,
    zero_run_encode,
    zero_run_size_bits,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
ALL_WIDTHS = [(bits, signed) for bits in range(1, 9) for signed in (False, True)]


def value_domain(bits: int, signed: bool) -> st.SearchStrategy[int]:
    if bits == 1 and signed:
        return st.sampled_from([-1, 1])
    if signed:
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


def reference_pack(values: list[int], bits: int, signed: bool) -> list[int]:
    """Slow independent reference: a string of '0'/'1', LSB-first per value, read back 8 chars per byte."""
    stream = ""
    for v in values:
        if bits == 1 and signed:
            code = 1 if v == 1 else 0
        elif v < 0:
            code = v + 2**bits
        else:
            code = v
        stream += format(code, f"0{bits}b")[::-1]  # least significant bit first
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]


def reference_zero_run(values: list[int], run_bits: int) -> tuple[list[int], list[int]]:
    """Slow reference of the scheme in the module docstring, one element at a time."""
    max_run = 2**run_bits - 1
    out_values, out_runs, zeros = [], [], 0
    for v in values:
        if v == 0:
            if zeros == max_run:  # this zero closes a filler entry
                out_values.append(0)
                out_runs.append(max_run)
                zeros = 0
            else:
                zeros += 1
        else:
            out_values.append(v)
            out_runs.append(zeros)
            zeros = 0
    if zeros:
        out_values.append(0)
        out_runs.append(zeros - 1)
    return out_values, out_runs


# --------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize(("bits", "signed"), ALL_WIDTHS)
@SETTINGS
@given(data=st.data())
def test_pack_round_trip_every_width(bits: int, signed: bool, data: st.DataObject) -> None:
    values = data.draw(st.lists(value_domain(bits, signed), min_size=0, max_size=70))
    fitting = [torch.int16, torch.int32, torch.int64]
    fitting += [torch.int8] if signed or bits < 8 else []
    fitting += [] if signed else [torch.uint8]
    dtype = data.draw(st.sampled_from(fitting))
    codes = torch.tensor(values, dtype=dtype)
    packed = pack_bits(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(len(values) * bits / 8) == packed_num_bytes(len(values), bits)
    restored = unpack_bits(packed, bits, signed, len(values))
    assert restored.dtype == (torch.int8 if signed else torch.uint8)
    assert restored.tolist() == values


@pytest.mark.parametrize(("bits", "signed"), ALL_WIDTHS)
@SETTINGS
@given(data=st.data())
def test_pack_matches_bit_string_reference(bits: int, signed: bool, data: st.DataObject) -> None:
    values = data.draw(st.lists(value_domain(bits, signed), min_size=0, max_size=19))
    packed = pack_bits(torch.tensor(values, dtype=torch.int64), bits, signed)
    assert packed.tolist() == reference_pack(values, bits, signed)


def test_pack_known_bytes() -> None:
    # 3-bit unsigned [1, 2, 3]: 1 | 2 << 3 | 3 << 6 = 209; the ninth stream bit (0) starts byte 2.
    assert pack_bits(torch.tensor([1, 2, 3]), 3, False).tolist() == [209, 0]
    # binary weights: -1 -> 0, +1 -> 1, first value in the least significant bit.
    assert pack_bits(torch.tensor([1, -1, -1, 1, 1, 1, -1, -1, 1]), 1, True).tolist() == [0b00111001, 1]
    # 4-bit signed two's complement: -1 = 0xF, 7 = 0x7 -> low nibble first.
    assert pack_bits(torch.tensor([-1, 7, -8]), 4, True).tolist() == [0x7F, 0x08]


def test_pack_large_random_exact_sizes_and_shape() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        codes = torch.randint(0, 2**bits, (3, 5, 7, 11), generator=gen)
        packed = pack_bits(codes, bits, signed=False)
        assert packed.numel() == math.ceil(codes.numel() * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, False, codes.numel()).reshape(codes.shape).long(), codes)
    numpy_codes = np.array([[-3, 2], [1, -4]], dtype=np.int8)
    assert unpack_bits(pack_bits(numpy_codes, 3, True), 3, True, 4).tolist() == [-3, 2, 1, -4]
    # 3-bit values use exactly ceil(3n/8) bytes, not a byte each.
    assert [packed_num_bytes(n, 3) for n in (0, 1, 2, 3, 8, 9)] == [0, 1, 1, 2, 3, 4]


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_pack_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(QuantizationConfigError, match=r"`bits` must be an integer in \[1, 8\], got .*Dense"):
        pack_bits(torch.tensor([0]), bits, signed=False)  # type: ignore[arg-type]
    with pytest.raises(QuantizationConfigError, match=r"`bits` must be an integer in \[1, 8\]"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), bits, signed=False, numel=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "bits", "signed", "message"),
    [
        ([0, 8], 3, False, r"`values` must be integers in \[0, 7\] for bits=3, signed=False, got 8\. Clamp"),
        ([-1, 2], 3, False, r"in \[0, 7\] for bits=3, signed=False, got -1\."),
        ([3, 4], 3, True, r"in \[-4, 3\] for bits=3, signed=True, got 4\. .*larger `bits`"),
        ([-129], 8, True, r"in \[-128, 127\] for bits=8, signed=True, got -129\."),
        ([1, 0, -1], 1, True, r"must be -1 or \+1 for bits=1, signed=True \(binary weights\), got 0\. Map"),
        ([2], 1, False, r"in \[0, 1\] for bits=1, signed=False, got 2\."),
    ],
)
def test_pack_rejects_out_of_range(values: list[int], bits: int, signed: bool, message: str) -> None:
    with pytest.raises(QuantizationConfigError, match=message):
        pack_bits(torch.tensor(values), bits, signed)


def test_pack_rejects_float_and_unpack_rejects_bad_payload() -> None:
    with pytest.raises(QuantizationConfigError, match=r"`values` must have an integer dtype, got torch.float32"):
        pack_bits(torch.tensor([1.0]), 4, True)
    with pytest.raises(QuantizationConfigError, match=r"`packed` must be a uint8 torch.Tensor"):
        unpack_bits(torch.zeros(2, dtype=torch.int8), 4, True, 4)
    with pytest.raises(QuantizationConfigError, match=r"`packed` must hold .* = 2 bytes .* got 3\. Pass the same"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, True, 4)
    with pytest.raises(QuantizationConfigError, match=r"`numel` must be an integer >= 0, got -1"):
        packed_num_bytes(-1, 4)


# -------------------------------------------------------------------------------------------- zero-run
def sparse_lists(bits: int) -> st.SearchStrategy[list[int]]:
    nonzero = st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).filter(lambda v: v != 0)
    return st.lists(st.one_of(st.just(0), st.just(0), st.just(0), nonzero), max_size=120)


@SETTINGS
@given(data=st.data())
def test_zero_run_round_trip_and_reference(data: st.DataObject) -> None:
    bits = data.draw(st.integers(2, 8))
    run_bits = data.draw(st.integers(1, 5))
    values = data.draw(sparse_lists(bits))
    entry_values, runs = zero_run_encode(torch.tensor(values, dtype=torch.int32), bits, run_bits)
    assert (entry_values.tolist(), runs.tolist()) == reference_zero_run(values, run_bits)
    assert entry_values.dtype == torch.int32 and runs.dtype == torch.int64
    assert all(0 <= r <= 2**run_bits - 1 for r in runs.tolist())
    assert zero_run_decode(entry_values, runs, run_bits).tolist() == values
    assert zero_run_size_bits(torch.tensor(values, dtype=torch.int64), bits, run_bits) == len(entry_values) * (
        bits + run_bits
    )


def test_zero_run_fillers_and_edges() -> None:
    # run_bits=2 -> max_run 3: a gap of 5 zeros is one filler (4 zeros) + a run of 1.
    values = torch.tensor([0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0])
    entry_values, runs = zero_run_encode(values, bits=2, run_bits=2)
    assert entry_values.tolist() == [3, 0, 1, 0] and runs.tolist() == [2, 3, 1, 1]
    empty_values, empty_runs = zero_run_encode(torch.zeros(0, dtype=torch.int64), 4)
    assert empty_values.numel() == empty_runs.numel() == 0
    assert zero_run_decode(empty_values, empty_runs).numel() == 0
    zeros = torch.zeros(40, dtype=torch.int64)  # run_bits=4: 16 zeros per filler -> 16 + 16 + (0, 7)
    assert zero_run_encode(zeros, 4)[1].tolist() == [15, 15, 7]
    assert zero_run_decode(*zero_run_encode(zeros, 4)).tolist() == [0] * 40
    dense = torch.arange(1, 9)  # no zeros: one entry per value, run 0 -> larger than plain packing
    assert zero_run_size_bits(dense, 4, 4) == 8 * 8


def test_zero_run_sparse_tensor_is_smaller_than_dense_packing() -> None:
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-7, 8, (4096,), generator=gen)
    codes[torch.rand(4096, generator=gen) < 0.9] = 0
    assert zero_run_size_bits(codes, 4, 4) < packed_num_bytes(codes.numel(), 4) * 8
    assert torch.equal(zero_run_decode(*zero_run_encode(codes, 4, 4)), codes)


def test_zero_run_errors() -> None:
    with pytest.raises(QuantizationConfigError, match=r"`values` must be integers in \[-2, 1\] .* got 5\."):
        zero_run_encode(torch.tensor([-1, 5]), bits=2)
    with pytest.raises(QuantizationConfigError, match=r"`run_bits` must be an integer in \[1, 32\], got 0\."):
        zero_run_encode(torch.tensor([1]), bits=2, run_bits=0)
    with pytest.raises(QuantizationConfigError, match=r"`runs` must be in \[0, 3\], got 4\."):
        zero_run_decode(torch.tensor([1]), torch.tensor([4]), run_bits=2)
    with pytest.raises(QuantizationConfigError, match=r"`runs` must be >= 0, got -1\."):
        zero_run_decode(torch.tensor([1]), torch.tensor([-1]))
    with pytest.raises(QuantizationConfigError, match=r"same length, got 2 and 1\."):
        zero_run_decode(torch.tensor([1, 2]), torch.tensor([0]))


# --------------------------------------------------------------------------------------------- Huffman
def test_huffman_textbook_example() -> None:
    # CLRS, section 16.3: a:45 b:13 c:12 d:16 e:9 f:5 -> 0, 101, 100, 111, 1101, 1100 (224 bits).
    counts = {ord("a"): 45, ord("b"): 13, ord("c"): 12, ord("d"): 16, ord("e"): 9, ord("f"): 5}
    lengths = huffman_code_lengths(counts)
    assert lengths == {ord("a"): 1, ord("b"): 3, ord("c"): 3, ord("d"): 3, ord("e"): 4, ord("f"): 4}
    assert sum(counts[s] * lengths[s] for s in counts) == 224


@SETTINGS
@given(counts=st.dictionaries(st.integers(-200, 200), st.integers(1, 10_000), min_size=2, max_size=60))
def test_huffman_kraft_equality_and_optimality_bound(counts: dict[int, int]) -> None:
    lengths = huffman_code_lengths(counts)
    assert set(lengths) == set(counts)
    assert sum(Fraction(1, 2**length) for length in lengths.values()) == 1  # Kraft equality: a full tree
    total = sum(counts.values())
    entropy = -sum(c * math.log2(c / total) for c in counts.values())
    payload = sum(counts[s] * lengths[s] for s in counts)
    assert entropy - 1e-6 <= payload < entropy + total  # Shannon: H <= L < H + 1 per symbol


def test_huffman_edge_cases() -> None:
    assert huffman_code_lengths({}) == {}
    assert huffman_code_lengths({7: 3}) == {7: 1}
    assert huffman_code_lengths({1: 0, 2: 5, 3: 5}) == {2: 1, 3: 1}
    with pytest.raises(QuantizationConfigError, match=r"`counts\[2\]` must be an integer >= 0, got -1\."):
        huffman_code_lengths({1: 4, 2: -1})


def test_base_encode_size_bits() -> None:
    values = torch.tensor([0] * 45 + [1] * 13 + [2] * 12 + [3] * 16 + [4] * 9 + [5] * 5)
    expected = 224 + HUFFMAN_HEADER_BITS + 6 * (3 + HUFFMAN_LENGTH_FIELD_BITS)
    assert base_encode_size_bits(values, bits=3) == expected
    assert base_encode_size_bits(values[torch.randperm(100, generator=torch.Generator().manual_seed(2))], 3) == (
        expected
    )
    # Skewed 8-bit codes compress below the dense 8 bits per value.
    gen = torch.Generator().manual_seed(3)
    skewed = torch.round(torch.randn(10_000, generator=gen) * 3).clamp(-128, 127).to(torch.int8)
    assert base_encode_size_bits(skewed, 8) < 8 * skewed.numel() * 0.5
    assert base_encode_size_bits(torch.tensor([-1, 1, 1]), 1) == 3 + HUFFMAN_HEADER_BITS + 2 * 9
    with pytest.raises(QuantizationConfigError, match=r"in \[0, 3\] for bits=2, signed=False, got 4\."):
        base_encode_size_bits(torch.tensor([4]), 2)


# ------------------------------------------------------------------------------------------- container
def test_save_load_round_trip_and_exact_size(tmp_path: os.PathLike[str]) -> None:
    gen = torch.Generator().manual_seed(4)
    entries = {}
    for name, bits, signed, shape in [
        ("conv1.weight", 3, True, (8, 3, 3, 3)),
        ("fc.weight", 1, True, (10, 17)),
        ("fc2.weight", 5, False, (7,)),
        ("empty.weight", 4, False, (0, 3)),
    ]:
        numel = math.prod(shape)
        if bits == 1 and signed:
            codes = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        else:
            low = -(2 ** (bits - 1)) if signed else 0
            codes = torch.randint(low, low + 2**bits, shape, generator=gen)
        entries[name] = {
            "packed": pack_bits(codes, bits, signed),
            "bits": bits,
            "signed": signed,
            "shape": shape,
            "scale": torch.rand(shape[0], generator=gen),
            "zero_point": None if signed else torch.randint(0, 2**bits, (shape[0],), dtype=torch.int32),
            "codes": codes,  # kept only for the check below
        }
        assert entries[name]["packed"].numel() == packed_num_bytes(numel, bits)
    to_save = {name: {k: v for k, v in entry.items() if k != "codes"} for name, entry in entries.items()}
    to_save["fc2.weight"]["scale"] = torch.tensor([0.5], dtype=torch.bfloat16)  # any dtype, raw bytes
    to_save["fc2.weight"]["axis"] = 0
    path = tmp_path / "model.lqpk"  # type: ignore[operator]
    written = save_packed(path, to_save)

    blob = path.read_bytes()
    assert blob[:8] == PACKED_FILE_MAGIC
    header_len = int.from_bytes(blob[8:16], "little")
    json.loads(blob[16 : 16 + header_len])
    payload = sum(
        v.numel() * v.element_size() for entry in to_save.values() for v in entry.values() if torch.is_tensor(v)
    )
    assert os.path.getsize(path) == written == PACKED_FILE_PREFIX_BYTES + header_len + payload
    assert header_len < 300 * len(to_save)  # the JSON header stays small: a few hundred bytes per tensor

    loaded = load_packed(path)
    assert set(loaded) == set(to_save)
    for name, entry in to_save.items():
        got = loaded[name]
        assert set(got) == set(entry)
        assert (got["bits"], got["signed"], got["shape"]) == (entry["bits"], entry["signed"], tuple(entry["shape"]))
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), (name, key)
            elif key not in ("bits", "signed", "shape"):
                assert got[key] == value
        codes = unpack_bits(got["packed"], got["bits"], got["signed"], math.prod(got["shape"]))
        assert torch.equal(codes.reshape(got["shape"]).long(), entries[name]["codes"].long())


def test_save_load_errors(tmp_path: os.PathLike[str]) -> None:
    path = tmp_path / "bad.lqpk"  # type: ignore[operator]
    good = {"packed": pack_bits(torch.tensor([1, 2, 3]), 3, False), "bits": 3, "signed": False, "shape": (3,)}
    with pytest.raises(QuantizationConfigError, match=r"`tensors\['w'\]` is missing \['shape'\]"):
        save_packed(path, {"w": {k: v for k, v in good.items() if k != "shape"}})
    with pytest.raises(QuantizationConfigError, match=r"has 2 bytes, but shape \(6,\) at bits=3 packs into 3"):
        save_packed(path, {"w": {**good, "shape": (6,)}})  # 6 * 3 bits = 3 bytes
    with pytest.raises(QuantizationConfigError, match=r"`tensors\['w'\]\['extra'\]` must be a tensor, None"):
        save_packed(path, {"w": {**good, "extra": [1, 2]}})
    path.write_bytes(b"not a packed file")  # type: ignore[union-attr]
    with pytest.raises(QuantizationConfigError, match=r"is not a lightning-quant packed file"):
        load_packed(path)
