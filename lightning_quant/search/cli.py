"""``lightning-quant search``: a :class:`~lightning_quant.search.MixedPrecisionSearch` from a YAML config.

Every argument of the search is a key of the config (``factory`` and ``datamodule`` by ``class_path`` /
``init_args``), and an option on the command line, where ``--study-name`` and ``--study_name`` are the same::

    lightning-quant search --config configs/search.yaml
    lightning-quant search --config configs/search.yaml --storage journal:///tmp/search.log --study-name digits

Several workers on one study are started the same way, each with the same ``--storage`` and ``--study-name``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.search.bomp import MixedPrecisionSearch

__all__ = ["build_parser", "main"]

_OPTION = re.compile(r"^--([a-z][a-z0-9]*(?:-[a-z0-9]+)+)(=.*)?$")


def build_parser(prog: str | None = None) -> ArgumentParser:
    """The parser of ``lightning-quant search`` (the search's arguments, a ``--config`` file)."""
    parser = ArgumentParser(
        prog=prog,
        description=(
            "Bayesian optimisation (BOMP-NAS) of per-layer bit widths and architecture choices with a short "
            "quantization-aware fine-tune per trial, on an Optuna study (SQLite by default; --storage for several "
            "workers). Writes the Pareto front (table, plot, QuantSpec YAMLs) to --workdir. `--method autoqb` runs the "
            "AutoQB driver instead (`lightning-quant search --method autoqb --help`)."
        ),
        exit_on_error=True,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with the arguments below")
    parser.add_class_arguments(MixedPrecisionSearch, nested_key=None, fail_untyped=True, sub_configs=True)
    return parser


def _underscored(argv: Sequence[str]) -> list[str]:
    """``--study-name x`` -> ``--study_name x`` (the search's options are Python argument names)."""
    out = []
    for arg in argv:
        match = _OPTION.match(arg)
        out.append(f"--{match.group(1).replace('-', '_')}{match.group(2) or ''}" if match else arg)
    return out


def main(argv: Sequence[str] | None = None, prog: str | None = "lightning-quant search") -> int:
    """Run a search from the command line; returns the exit status (2 for a bad configuration)."""
    parser = build_parser(prog)
    config = parser.parse_args(_underscored(sys.argv[1:] if argv is None else argv))
    try:
        init = parser.instantiate(config)
        init.pop("config", None)
        init.pop("__path__", None)
        search = MixedPrecisionSearch(**init)
        result = search.run()
    except QuantizationConfigError as err:
        print(f"lightning-quant search: error: {err}", file=sys.stderr)
        return 2
    print(result.table())
    print(f"\nPareto front, plot and QuantSpec files in {search.workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
