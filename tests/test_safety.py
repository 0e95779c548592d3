"""Safety: files load as tensors and plain containers, YAML through safe loaders, no eval/exec of strings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantizationConfigError, load_quantized
from lightning_quant.models import ImageClassifier, LeNet5

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_quant"

# pattern -> files allowed to match it, with the reason
FORBIDDEN = {
    r"weights_only\s*=\s*False": {},
    r"(?<![\w.])eval\(": {},
    r"(?<![\w.])exec\(": {},
    r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b": {},
    r"pickle\.loads?\(": {
        # CIFAR-10's official python batches are pickles: the dataset's own on-disk format, read from the root the
        # user points at (like torchvision's CIFAR10 does)
        "datamodules/vision.py",
    },
    r"torch\.load\((?![^)]*weights_only=True)": {},
}


@pytest.mark.parametrize("pattern", list(FORBIDDEN))
def test_the_package_does_not_unpickle_or_evaluate_untrusted_input(pattern: str) -> None:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            message = line.strip().startswith(('"', "'", 'f"', "f'"))  # text of an error message, not code
            if re.search(pattern, line) and not message and relative not in FORBIDDEN[pattern]:
                hits.append(f"{relative}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


class Payload:
    """Any object a pickle can carry (a real attack would run code while unpickling)."""


def test_a_checkpoint_with_arbitrary_objects_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(QuantizationConfigError, match=r"`checkpoint` .* holds Python objects .*HINT"):
        load_quantized(ImageClassifier(LeNet5()), path)
