"""Loading files safely: tensors and plain containers only (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import pickle
from typing import IO, Any

import torch

from lightning_quant.core.errors import QuantizationConfigError

__all__ = ["load_weights_only"]


def load_weights_only(path: str | os.PathLike[str] | IO[bytes], argument: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (a path or a binary file object); a file that
    needs arbitrary unpickling (which could run code) is refused with an error that names ``argument`` and the way
    out."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        shown = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
        raise QuantizationConfigError(
            f"`{argument}` {shown!r} holds Python objects besides tensors and plain containers, which "
            "`torch.load(weights_only=True)` refuses (unpickling them could run code). HINT: save the state dict "
            "(`torch.save(model.state_dict(), path)`); or, for a file you trust, load it yourself with "
            "`torch.load(path, weights_only=False)` and pass the loaded dict where a dict is accepted."
        ) from err
