"""Export: integer packing and real on-disk size (:mod:`lightning_quant.export.packing`)."""

from lightning_quant.export.packing import (
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

__all__ = [
    "base_encode_size_bits",
    "huffman_code_lengths",
    "load_packed",
    "pack_bits",
    "packed_num_bytes",
    "save_packed",
    "unpack_bits",
    "zero_run_decode",
    "zero_run_encode",
    "zero_run_size_bits",
]
