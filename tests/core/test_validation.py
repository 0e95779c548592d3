"""The argument checks of :mod:`lightning_quant.core.validation`: one message format, and no private copies."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import lightning_quant
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.validation import (
    check_bits,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_names,
    check_real,
    config_error,
)

#: ``` `argument` must be <requirement>, got <value>. HINT: <fix>``` -- the one format of every check
FORMAT = re.compile(r"^`(?P<argument>[^`]+)` must be (?P<requirement>.+), got (?P<value>.+)\. HINT: (?P<fix>.+)$")

BAD = [
    (lambda: check_int("epochs", 0, minimum=1), "epochs", "an integer >= 1", "0", "pass e.g. `epochs=1`."),
    (lambda: check_int("n", True), "n", "an integer", "True", "pass e.g. `n=1`."),
    (lambda: check_int("k", 9, minimum=1, maximum=8), "k", "an integer in [1, 8]", "9", "pass e.g. `k=1`."),
    (lambda: check_int("k", 9, maximum=8), "k", "an integer <= 8", "9", "pass e.g. `k=8`."),
    (lambda: check_int("m", -1, minimum=0, allow_none=True, fix="None: all."), "m", "an integer >= 0 or None", "-1",
     "None: all."),
    (lambda: check_real("lr", 0, minimum=0, minimum_inclusive=False), "lr", "a finite number > 0", "0",
     "pass e.g. `lr=1`."),
    (lambda: check_real("p", 1.5, minimum=0, maximum=1), "p", "a finite number >= 0 and <= 1", "1.5",
     "pass e.g. `p=0`."),
    (lambda: check_real("f", 1.0, minimum=0, maximum=1, minimum_inclusive=False, maximum_inclusive=False), "f",
     "a finite number > 0 and < 1", "1.0", "pass e.g. `f=0.5`."),
    (lambda: check_real("b", float("nan"), minimum=0, allow_none=True, fix="a budget."), "b",
     "a finite number >= 0 or None", "nan", "a budget."),
    (lambda: check_real("x", "1"), "x", "a finite number", "'1'", "pass e.g. `x=0.0`."),
    (lambda: check_choice("mode", "w4", ("qat", "ptq")), "mode", "one of ['qat', 'ptq']", "'w4'",
     "pass e.g. `mode='qat'`."),
    (lambda: check_bool("plot", "yes"), "plot", "True or False", "'yes'", "pass `plot=True` or `plot=False`."),
    (lambda: check_names("layers", "fc"), "layers", "a list of layer-name patterns", "'fc'",
     "pass e.g. `layers=['fc']`."),
    (lambda: check_names("layers", [3]), "layers", "a list of layer-name patterns", "[3]",
     "pass e.g. `layers=['conv*']`."),
    (lambda: check_bits("bits", 9), "bits", "within [2, 8]", "9", "pass e.g. `bits=4`."),
    (lambda: check_bits("bits", 3.5), "bits", "an integer number of bits in [2, 8]", "3.5", "pass e.g. `bits=4`."),
    (lambda: check_bits("bits", 1), "bits", "within [2, 8]", "1", "for binary weights pass `binary_weights=True` "
     "(or a LayerSpec with weight_bits=1)."),
]  # fmt: skip


@pytest.mark.parametrize(("call", "argument", "requirement", "value", "fix"), BAD)
def test_every_check_speaks_the_one_format(call, argument, requirement, value, fix) -> None:
    with pytest.raises(QuantizationConfigError) as info:
        call()
    match = FORMAT.match(str(info.value))
    assert match is not None, str(info.value)
    assert match.groupdict() == {"argument": argument, "requirement": requirement, "value": value, "fix": fix}


def test_config_error_is_the_format() -> None:
    assert (
        str(config_error("a", "an integer", 0.5, "pass `a=1`.")) == "`a` must be an integer, got 0.5. HINT: pass `a=1`."
    )


def test_good_values_come_back_normalised() -> None:
    assert check_int("n", 3, minimum=1) == 3
    assert check_int("n", None, allow_none=True) is None
    assert check_int("n", np.int64(3), integral=True) == 3 and type(check_int("n", np.int64(3), integral=True)) is int
    with pytest.raises(QuantizationConfigError, match=r"`n` must be an integer, got np.int64\(3\)"):
        check_int("n", np.int64(3))  # numpy integers only where the caller asks for them
    assert check_real("lr", 1) == 1.0 and type(check_real("lr", 1)) is float
    assert check_real("f", 0.5, minimum=0, maximum=1, minimum_inclusive=False, maximum_inclusive=False) == 0.5
    assert check_fraction("val_fraction", 0.25) == 0.25
    with pytest.raises(QuantizationConfigError, match=r"`val_fraction` must be a finite number > 0 and < 1, got 1\.0"):
        check_fraction("val_fraction", 1.0)
    assert check_choice("mode", "ptq", ("qat", "ptq")) == "ptq"
    assert check_bool("plot", False) is False
    assert check_names("layers", ["fc*"]) == ("fc*",)
    assert check_names("layers", None) is None
    assert check_names("layers", "fc", allow_string=True) == ("fc",)
    assert check_bits("bits", 1, allow_binary=True) == 1
    assert check_bits("bits", 1, low=1) == 1
    assert validate_bits is check_bits  # the old name, kept for the package's callers


#: private argument checks that core.validation replaced; they must not come back
REPLACED = {
    "_check_int",
    "_check_real",
    "_check_positive_int",
    "_check_positive_float",
    "_check_count",
    "_check_choice",
    "_check_fraction",
    "_check_patterns",
    "_check_budget",
    "_check_beta",
}


def test_no_module_defines_its_own_argument_checks() -> None:
    package = Path(lightning_quant.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in REPLACED:
                found.append(f"{path.relative_to(package)}:{node.lineno} {node.name}")
    assert len(list(package.rglob("*.py"))) > 20  # the walk did see the package
    assert not found, f"use lightning_quant.core.validation instead of private checks: {found}"
