"""The ``lightning-quant`` command line: LightningCLI subcommands from the shipped configs, and dispatch."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_quant.cli import COMMANDS, Command, main
from lightning_quant.surgery import SPEC_KEY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MNIST_ROOT = ROOT.parent / "shared" / "data"

# Lightning 2.6 calls jsonargparse APIs that jsonargparse 4.4x deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")

#: short runs: one epoch of three batches, validation on two
TINY = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
)


@pytest.fixture(autouse=True)
def _torch_globals():
    # tiny models: one thread is as fast, and does not crawl when the CPU is shared; and the configs'
    # `deterministic: warn` must not leak into other tests of the same process
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _config_args(config: str | Path = CONFIGS / "quickstart.yaml") -> list[str]:
    return ["--config", str(CONFIGS / "trainer.yaml"), "--config", str(config)]


def _fit(tmp_path: Path, *extra: str) -> Path:
    """Run a tiny `fit` of the quickstart config; returns its log directory."""
    assert main(["fit", *_config_args(), *TINY, f"--trainer.default_root_dir={tmp_path}", *extra]) == 0
    (log_dir,) = sorted((tmp_path / "lightning_logs").iterdir())
    return log_dir


def _metrics(log_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in the run's metrics.csv."""
    last: dict[str, float] = {}
    with open(log_dir / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            last.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return last


def test_fit_quantizes_the_model_and_writes_the_config(tmp_path):
    log_dir = _fit(tmp_path)

    # the resolved configuration, callbacks included, is saved beside the logs
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_quant.callbacks.QuantizationAwareTraining"
    assert (callback["init_args"]["weight_bits"], callback["init_args"]["act_bits"]) == (4, 4)
    assert config["model"]["init_args"]["backbone"]["class_path"] == "lightning_quant.models.CifarResNet"

    # the checkpoint carries the per-layer recipe, and the QAT metrics were logged
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    layers = checkpoint[SPEC_KEY]["layers"]
    assert layers["backbone.layer1.0.conv1"]["weight_bits"] == 4
    assert layers["backbone.conv1"]["weight_bits"] == 8  # the first layer stays at 8 bits
    assert any(key.endswith("weight_quantizer.scale") for key in checkpoint["state_dict"])
    metrics = _metrics(log_dir)
    assert 4.0 <= metrics["quant/qat/avg_weight_bits"] < 4.5
    assert metrics["quant/qat/compression"] > 3


def test_a_second_run_in_the_same_folder_may_overwrite_its_config(tmp_path):
    # without a logger, config.yaml goes to default_root_dir, where LightningCLI refuses to overwrite it
    # unless told to (the CLI tells it to)
    args = ["fit", *_config_args(), *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    args.append("--trainer.enable_checkpointing=false")
    assert main(args) == 0
    assert main([*args, "--trainer.max_epochs=2"]) == 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["max_epochs"] == 2


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # a new run folder: Lightning's note
def test_validate_restores_the_quantized_checkpoint(tmp_path):
    log_dir = _fit(tmp_path)
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    val_acc_after_fit = _metrics(log_dir)["val/acc"]

    validate_root = tmp_path / "validate"
    args = ["validate", *_config_args(), *TINY, f"--trainer.default_root_dir={validate_root}", f"--ckpt_path={ckpt}"]
    assert main(args) == 0
    (validate_dir,) = (validate_root / "lightning_logs").iterdir()
    # the same quantized weights, step sizes and batches give the same accuracy (a float model would not)
    assert _metrics(validate_dir)["val/acc"] == pytest.approx(val_acc_after_fit, abs=0)


def test_bad_value_in_yaml_exits_with_the_callbacks_message(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["weight_bits"] = 9
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))

    status = main(["fit", *_config_args(bad), f"--trainer.default_root_dir={tmp_path}"])

    assert status == 2
    err = capsys.readouterr().err
    assert "lightning-quant: error: `weight_bits` must be within [2, 8], got 9." in err
    assert "Traceback" not in err
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_bad_value_on_the_command_line_exits_with_status_2_from_the_console_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_quant.cli",
            "fit",
            *_config_args(),
            "--trainer.callbacks.init_args.act_bits=1",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "`act_bits` must be within [2, 8], got 1." in result.stderr


@pytest.mark.parametrize("config", ["quickstart.yaml", "mnist_qat.yaml"])
def test_shipped_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_config_args(CONFIGS / config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"][0]["init_args"]["weight_bits"] == 4
    assert printed["seed_everything"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST_ROOT / "MNIST" / "raw").is_dir(), reason="MNIST is not in ../shared/data")
def test_mnist_config_fits(tmp_path):
    args = ["fit", *_config_args(CONFIGS / "mnist_qat.yaml"), *TINY, f"--trainer.default_root_dir={tmp_path}"]
    assert main([*args, f"--data.init_args.root={MNIST_ROOT}"]) == 0
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    assert 4.0 <= _metrics(log_dir)["quant/qat/avg_weight_bits"] < 5


def test_kernel_quantization_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_config_args(CONFIGS / "kernel_quantization.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    (callback,) = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_quant.callbacks.KernelQuantizationCallback"
    assert callback["init_args"]["index_bits"] == 4 and callback["init_args"]["exclude"] == ["backbone.fc"]


@pytest.mark.parametrize("config", ["threshold_tuning.yaml", "block_replacement.yaml", "kernel_quantization.yaml"])
def test_configs_take_trained_float_weights(config, tmp_path):
    from lightning_quant.models import ImageClassifier, LeNet5, resnet8

    backbone = resnet8(in_channels=1) if config == "kernel_quantization.yaml" else LeNet5(input_size=28)
    fp = ImageClassifier(backbone)
    torch.save(fp.state_dict(), tmp_path / "fp.pt")
    args = ["fit", *_config_args(CONFIGS / config), f"--trainer.default_root_dir={tmp_path}"]
    # the path reaches ImageClassifier(weights=...), which loads it when the CLI builds the model (jsonargparse
    # re-raises the model's error as a ValueError that quotes it)
    with pytest.raises((FileNotFoundError, ValueError), match=r"`weights` file '.*missing.pt' does not exist"):
        main([*args, f"--model.init_args.weights={tmp_path / 'missing.pt'}"])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--model.init_args.weights={tmp_path / 'fp.pt'}", "--print_config"])
    assert exit_info.value.code == 0


def test_help_lists_the_suites_own_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "quickstart" in out
    assert "fit" in out


def test_quickstart_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quickstart", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "lightning-quant quickstart" in out
    assert "--weight-bits" in out


def test_quickstart_rejects_bad_bits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quickstart", "--weight-bits", "9", "--epochs-fp", "1", "--epochs-qat", "1"])
    assert exit_info.value.code == 2
    assert "`weight_bits` must be within [2, 8], got 9." in capsys.readouterr().err


def test_own_subcommands_are_dispatched_before_lightning(monkeypatch):
    seen = []
    monkeypatch.setitem(COMMANDS, "search", Command("a later subcommand", lambda argv: seen.append(argv) or 3))
    assert main(["search", "--trials", "5"]) == 3
    assert seen == [["--trials", "5"]]


def test_search_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--config", str(CONFIGS / "search.yaml"), "--study-name", "other", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["study_name"] == "other"  # `--study-name` is `--study_name`
    assert printed["max_size_kib"] == 30 and printed["weight_bits"] == [2, 3, 4, 8]
    assert printed["factory"]["class_path"] == "lightning_quant.search.ImageClassifierFactory"
    assert printed["architecture"] == {"width_multiplier": [0.5, 0.75, 1.0]}


def test_search_help_and_bad_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "lightning-quant search" in out and "--storage" in out and "--max_size_kib" in out
    status = main(["search", "--config", str(CONFIGS / "search.yaml"), "--max-size-kib", "1", f"--workdir={tmp_path}"])
    assert status == 2
    assert "No configuration of the search space meets the budget (max_size_kib=1.0)" in capsys.readouterr().err
    assert not (tmp_path / "fp").exists()


@pytest.mark.slow
def test_search_config_runs(tmp_path, capsys):
    args = ["search", "--config", str(CONFIGS / "search.yaml"), f"--workdir={tmp_path}", "--n-trials=2"]
    args += ["--fp_epochs=1", "--qat_epochs=1", "--progress_bar=false", "--num_calibration_batches=1"]
    args += ["--trainer_kwargs={accelerator: cpu, limit_train_batches: 2, limit_val_batches: 1}"]
    assert main(args) == 0
    assert "| trial | origin | architecture |" in capsys.readouterr().out
    assert (tmp_path / "pareto_front.png").exists() and list((tmp_path / "specs").glob("trial_*.yaml"))
