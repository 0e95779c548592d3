"""int8 across torchvision's classification zoo: how many convs run in integers in onnxruntime, and how fast.

For each model (random weights: the graph decides int8, and latency does not depend on the weights), W8A8
(per-channel int8 weights, 8-bit activations) exported with :func:`lightning_quant.export.export_onnx`
without and with ``QuantSpec(quantize_residuals=True)`` (the deployment recipe, which places a quantizer after
every conv whose output an int8 runtime would otherwise see in float), next to onnxruntime's own
``quantize_static`` and NNCF's ``nncf.quantize`` (when installed) of the same float graph, all calibrated on the
same 4 random batches. ``int8 convs`` counts ``QLinearConv`` in onnxruntime's optimised graph against the convs of
the PyTorch model; latency is onnxruntime (``ORT_ENABLE_ALL``, 2 intra-op threads, no spin-waiting: spinning threads
of the session that ran last would take the cores from the next) at batch 1, rounds interleaved, median over
rounds, ratio = median per-round fp32/variant.

    python benchmarks/zoo_int8.py                  # updates the section in BENCHMARKS.md
    python benchmarks/zoo_int8.py --no-write --models mobilenet_v2 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision
from common import rerun_command, write_section
from export_latency import calibrate, export_float, nncf_quantize, ort_quantize_static, time_variants

from lightning_quant.export import create_session, export_onnx, int8_blockers
from lightning_quant.export.onnx import count_conv_ops
from lightning_quant.surgery import LayerSpec, QuantSpec, quantize_model

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## int8 across torchvision's zoo (onnxruntime, CPU)"
MODELS = (
    "resnet18",
    "mobilenet_v2",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "densenet121",
    "squeezenet1_1",
    "mobilenet_v3_small",
)
OURS_BEFORE = "lightning-quant (inputs only)"
OURS = "lightning-quant (quantize_residuals=True)"
ORT_STATIC = "peer: ORT quantize_static"
NNCF = "peer: NNCF PTQ"


def _markdown(text: str) -> str:
    """The docstring's reST roles and double backticks as markdown code."""
    return re.sub(r":func:`(?:[\w.]+\.)?(\w+)`", r"`\1`", text).replace("``", "`")


def rows_for(name: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    build = getattr(torchvision.models, name)
    model = build().eval()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    calib = [torch.randn(4, 3, args.size, args.size) for _ in range(4)]
    x = torch.randn(1, 3, args.size, args.size)
    fp32_path = export_float(model, x, tmp / f"{name}_fp32.onnx")
    files = {}
    blockers = {}
    for variant, residuals in ((OURS_BEFORE, False), (OURS, True)):
        quantized = quantize_model(build().eval(), QuantSpec(default=LayerSpec(), quantize_residuals=residuals))
        quantized.load_state_dict(model.state_dict(), strict=False)  # same float weights
        calibrate(quantized, calib)
        blockers[variant] = len(int8_blockers(quantized))
        files[variant] = export_onnx(quantized, tmp / f"{name}_{residuals}.onnx", x)
    files[ORT_STATIC] = ort_quantize_static(fp32_path, [c.numpy() for c in calib], tmp / f"{name}_ortq.onnx")
    nncf_path = nncf_quantize(fp32_path, [c.numpy() for c in calib], tmp / f"{name}_nncf.onnx")
    if nncf_path is not None:
        files[NNCF] = nncf_path
    feed = {"input": x.numpy()}
    sessions = {"ORT fp32": create_session(fp32_path, spin=False)}
    counts = {}
    for k, (variant, path) in enumerate(files.items()):
        optimized = tmp / f"{name}_opt{k}.onnx"
        sessions[variant] = create_session(path, optimized_model_path=optimized, spin=False)
        counts[variant] = count_conv_ops(optimized)[0]
    runners = {variant: (lambda s=s: s.run(None, feed)) for variant, s in sessions.items()}
    rows = []
    for variant, run in list(runners.items()):
        try:
            run()
        except Exception as err:  # a peer's file that onnxruntime cannot run: report it, time the others
            # onnxruntime's own sentence, without the C++ frame, on one line
            message = " ".join(str(err).rsplit(" : ", 1)[-1][:160].split())
            rows.append(
                f"| {name} | {variant} | {counts.get(variant, '')} / {convs} | | fails in onnxruntime: `{message}` | |"
            )
            del runners[variant]
    times = time_variants(runners, args.rounds, args.inner)
    base = times["ORT fp32"]
    for variant, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        count = f"{counts[variant]} / {convs}" if variant in counts else ""
        flagged = str(blockers[variant]) if variant in blockers else ""
        rows.append(f"| {name} | {variant} | {count} | {flagged} | {statistics.median(ts) * 1000:.2f} | {ratio:.2f} |")
    print("\n".join(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=2, help="runs per timed block")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before, start = os.getloadavg()[0], time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        for name in args.models:
            rows += rows_for(name, args, Path(tmp_dir))
    load_after = os.getloadavg()[0]
    try:
        import nncf

        peers = f"NNCF {nncf.__version__}."
    except ImportError:
        peers = "NNCF not installed: no NNCF rows."
    section = "\n".join(
        [
            SECTION,
            "",
            _markdown(" ".join(__doc__.split("\n\n")[1].split())),
            "`flagged` = convs that `int8_blockers(model)` names as running in float (read from the PyTorch model).",
            "",
            "```",
            rerun_command("zoo_int8.py", sys.argv[1:]),
            "```",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average"
            f" {load_before:.1f} before, {load_after:.1f} after), torch {torch.__version__}, onnxruntime"
            f" {ort.__version__}, {peers} Input {args.size}x{args.size}, {args.rounds} rounds of {args.inner};"
            f" measured {datetime.date.today()}, {(time.time() - start) / 60:.0f} min in all.",
            "",
            "| model | variant | int8 convs | flagged | median ms | × fp32 speed |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, section)


if __name__ == "__main__":
    main()
