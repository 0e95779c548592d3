"""The ``lightning-quant`` command line.

Two kinds of subcommands share one entry point:

* Lightning's own, ``fit``, ``validate``, ``test`` and ``predict``, run by
  :class:`~lightning.pytorch.cli.LightningCLI` from YAML configs. The model is any ``LightningModule`` and the
  data any ``LightningDataModule``, each given by ``class_path``/``init_args``; the suite's callbacks go into
  ``trainer.callbacks`` the same way::

      lightning-quant fit --config configs/trainer.yaml --config configs/quickstart.yaml --trainer.max_epochs=3

* The suite's own commands (``quickstart``, ``search``), each a program registered in :data:`COMMANDS` and
  dispatched before LightningCLI sees the arguments::

      lightning-quant quickstart --weight-bits 4 --act-bits 4
      lightning-quant search --config configs/search.yaml --storage journal:///tmp/s.log --study-name digits
      lightning-quant search --method autoqb --model resnet8 --avg-weight-bits 3 --episodes 100
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from lightning_quant.core.errors import QuantizationConfigError, UnsupportedModuleError

__all__ = ["COMMANDS", "LIGHTNING_SUBCOMMANDS", "Command", "QuantCLI", "main"]

#: the subcommands that LightningCLI runs
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

_SILENCED_WARNINGS = (
    # on every run without TensorBoard: Lightning falls back to CSVLogger, this command's documented default
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    # lightning 2.6 with torch >= 2.10 internally; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@dataclass(frozen=True)
class Command:
    """One of the suite's own subcommands.

    Args:
        help: the one-line description shown by ``lightning-quant --help``.
        run: called with the arguments after the subcommand's name; returns the exit status.
    """

    help: str
    run: Callable[[list[str]], int]


def _quickstart(argv: list[str]) -> int:
    from lightning_quant.quickstart import main as quickstart_main

    return quickstart_main(argv, prog="lightning-quant quickstart")


#: search methods of ``lightning-quant search --method <name>`` (default ``bomp``): each a program taking the other
#: arguments and its ``prog``
SEARCH_METHODS: dict[str, Callable[[list[str], str], int]] = {}


def _search_bomp(argv: list[str], prog: str) -> int:
    from lightning_quant.search.cli import main as search_main

    return search_main(argv, prog=prog)


def _search_autoqb(argv: list[str], prog: str) -> int:
    from lightning_quant.search.autoqb import main as autoqb_main

    return autoqb_main(argv, prog=prog)


SEARCH_METHODS["bomp"] = _search_bomp
SEARCH_METHODS["autoqb"] = _search_autoqb


def _search(argv: list[str]) -> int:
    """``lightning-quant search [--method <name>] ...``: dispatch to the method's own program (BOMP-NAS's by
    default)."""
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-quant search", add_help=False, allow_abbrev=False)
    parser.add_argument("--method", choices=sorted(SEARCH_METHODS), default="bomp")
    known, rest = parser.parse_known_args(argv)
    prog = "lightning-quant search" if known.method == "bomp" else f"lightning-quant search --method {known.method}"
    return SEARCH_METHODS[known.method](rest, prog)


#: the suite's own subcommands by name
COMMANDS: dict[str, Command] = {
    "quickstart": Command(
        "train a small CNN on scikit-learn's digits (offline), quantize it with QAT, report accuracy and size",
        _quickstart,
    ),
    "search": Command(
        "Bayesian search (BOMP-NAS) over per-layer bits and architecture with QAT in the loop; Pareto front; "
        "`--method autoqb`: reinforcement-learning search of per-channel widths (AutoQB)",
        _search,
    ),
}


def _description() -> str:
    own = "\n".join(f"  {name:<11} {command.help}" for name, command in COMMANDS.items())
    return (
        "lightning-quant: quantization callbacks for PyTorch Lightning.\n\n"
        "Lightning subcommands (below) take YAML configs: "
        "`lightning-quant fit --config configs/trainer.yaml --config configs/quickstart.yaml`.\n"
        f"The suite's own subcommands (`lightning-quant <name> --help` for their options):\n{own}"
    )


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, with the description's line breaks kept."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class QuantCLI(LightningCLI):
    """LightningCLI for any ``LightningModule`` and ``LightningDataModule`` given by ``class_path``.

    The suite's callbacks are configured in ``trainer.callbacks``. ``config.yaml`` is written to the run's
    log directory and overwritten when a run repeats.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": _description(), "formatter_class": _HelpFormatter},
            args=list(args) if args is not None else None,
            run=run,
        )


def main(args: Sequence[str] | None = None) -> int:
    """Run ``lightning-quant``: the suite's own subcommands, or Lightning's through :class:`QuantCLI`.

    Args:
        args: the arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status (0 on success). Errors in the arguments or the configuration exit with status 2 and
        a message on stderr.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]].run(argv[1:])
    with warnings.catch_warnings():
        for message in _SILENCED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            # LightningCLI reads sys.argv (and warns when given both): run as if `argv` were the command line
            with _command_line(argv):
                QuantCLI()
        except Exception as err:
            # jsonargparse wraps what a class raises while it is instantiated from the config into its own
            # ValueError with a long traceback; the suite's own errors already say what to fix
            cause = _suite_error(err)
            if cause is None:
                raise
            print(f"lightning-quant: error: {cause}", file=sys.stderr)
            return 2
    return 0


@contextlib.contextmanager
def _command_line(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lightning-quant", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _suite_error(err: BaseException) -> BaseException | None:
    """The suite's configuration error in ``err``'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (QuantizationConfigError, UnsupportedModuleError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
