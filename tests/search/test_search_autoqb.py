"""The AutoQB driver (`lightning-quant search --method autoqb`) and the shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_quant import QuantSpec
from lightning_quant.cli import main as cli_main
from lightning_quant.search.autoqb import main as autoqb_main

ROOT = Path(__file__).resolve().parents[2]

# Lightning 2.6 calls jsonargparse APIs that jsonargparse 4.4x deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_search_command_writes_the_policy_and_reports(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "search",
        "--method",
        "autoqb",
        "--model",
        "lenet5",
        "--avg-weight-bits",
        "3",
        "--episodes",
        "3",
        "--warmup-episodes",
        "2",
        "--channels-per-unit",
        "16",
        "--fp-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--output",
        str(out),
        "--no-progress-bar",
    ]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "AutoQB best policy: episode" in text and "after fine-tuning: test accuracy" in text
    spec = QuantSpec.load(out / "autoqb_spec.yaml")
    assert spec.layers["backbone.conv1"].weight_bits == 8  # first layer frozen at 8 bits
    for name in ("autoqb_search.json", "autoqb_search.pt", "model.lqpk"):
        assert (out / name).is_file(), name
    # the same options again: the finished search is reused, not run again
    assert autoqb_main(args[3:]) == 0
    assert "episode" in capsys.readouterr().out


def test_search_command_needs_one_budget_and_a_known_method(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["search", "--method", "autoqb", "--episodes", "3"])
    assert exit_info.value.code == 2
    assert "one of the arguments --size-budget --bops-budget --avg-weight-bits is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["search", "--method", "annealing"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'annealing'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["search", "--method", "autoqb", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "lightning-quant search --method autoqb" in out and "--channels-per-unit" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["search", "--help"])  # BOMP-NAS, the default method, names the other one
    assert exit_info.value.code == 0
    assert "--method autoqb" in capsys.readouterr().out


def test_shipped_config_parses(capsys) -> None:
    config = ["--config", str(ROOT / "configs" / "trainer.yaml"), "--config", str(ROOT / "configs" / "autoqb.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *config, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in printed["trainer"]["callbacks"]}
    assert callbacks["AutoQBCallback"]["size_budget"] == 231216
    assert callbacks["AutoQBCallback"]["level"] == "channel"
    assert callbacks["QuantizationAwareTraining"]["act_bits"] == 8
