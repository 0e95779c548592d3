"""int8 vs fp32 latency of exported models on this CPU, and accuracy fp32 / fake-quant / onnxruntime side by side.

Latency: ResNet-20 (batch 1 and 64, 32x32) and torchvision ResNet-18 (batch 16, 224x224), W8A8 (per-channel weights,
8-bit activations), exported with :func:`lightning_quant.export.export_onnx`, run by onnxruntime
(``ORT_ENABLE_ALL``, 2 intra-op threads, no spin-waiting between runs) next to the float model exported by
``torch.onnx.export`` and run the same way; with and without residual quantizers
(``QuantSpec(quantize_residuals=True)``). Variants are interleaved (one timed block of each per round, order rotated
every round) and the table reports medians over rounds and the median per-round ratio to fp32. Peer lines on the
same float weights: onnxruntime's own ``quantize_static`` (QDQ, per-channel, U8S8, ``quant_pre_process`` first),
NNCF's ``nncf.quantize`` of the float ONNX graph (when NNCF is installed) and torch.ao's FX-mode int8 model.
OpenVINO runs our QDQ file and NNCF's when it is installed.

INT4 weights (a section of its own): W4 ResNet-20 (every layer's weights 4-bit, random weights, calibrated on random
batches) exported with ``weight_storage="int8"`` and ``"int4"``, W4A8 with residual quantizers (int8-ready) and
W4A4: file size beside ``save_packed_model``'s, onnxruntime latency of both files next to ORT fp32 (OpenVINO too
when installed), and top-1 agreement of each file with the PyTorch fake-quant model on random inputs.

Accuracy: ResNet-8 trained briefly (float) on sklearn digits, quantized W8A8 and calibrated; top-1 on the digits
test split in PyTorch fp32, PyTorch fake-quant and onnxruntime int8.

    python benchmarks/export_latency.py              # updates the section in BENCHMARKS.md
    python benchmarks/export_latency.py --no-write   # print only
    python benchmarks/export_latency.py --only int4  # only the INT4 section
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import write_section  # benchmarks/common.py (the script's folder is on sys.path)
from torch.nn import functional as F

from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.export import create_session, export_onnx, openvino_available, verify_onnx
from lightning_quant.export.onnx import count_conv_ops
from lightning_quant.models import resnet8, resnet20
from lightning_quant.surgery import LayerSpec, QuantSpec, calibrate, quantize_model

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## ONNX export: int8 vs fp32 latency and accuracy (CPU)"
SECTION_INT4 = "## ONNX export: INT4 weight files (size and latency, CPU)"


def export_float(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(
        model.eval(),
        (x,),
        os.fspath(path),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        verbose=False,
    )
    return path


def ort_quantize_static(float_path: Path, batches: list[np.ndarray], out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(os.fspath(float_path), os.fspath(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        os.fspath(pre),
        os.fspath(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def time_variants(runners: dict[str, callable], rounds: int, inner: int) -> dict[str, list[float]]:
    for run in runners.values():  # warm-up
        for _ in range(2):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                runners[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def nncf_quantize(float_path: Path, batches: list[np.ndarray], out: Path) -> Path | None:
    """NNCF's post-training quantization of the float ONNX graph (its ONNX backend), or None without NNCF."""
    try:
        import nncf
        import onnx
    except ImportError:
        return None
    model = nncf.quantize(onnx.load(os.fspath(float_path)), nncf.Dataset(batches, lambda b: {"input": b}))
    onnx.save(model, os.fspath(out))
    return out


def torch_ao_int8(build, calib: list[torch.Tensor], example: torch.Tensor):
    """torch.ao's FX-mode post-training int8 model (x86 backend), or None where this torch cannot convert."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(build().eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for c in calib:
                prepared(c)
        return convert_fx(prepared)
    except Exception as err:  # deprecated API: report, do not fail the benchmark
        print(f"torch.ao int8 conversion failed: {type(err).__name__}: {err}", flush=True)
        return None


def ours(build, state: dict, calib: list[torch.Tensor], residuals: bool) -> torch.nn.Module:
    model = quantize_model(build().eval(), QuantSpec(default=LayerSpec(), quantize_residuals=residuals))
    model.load_state_dict(state, strict=False)  # same float weights (quantizers keep their steps)
    return calibrate(model, calib)


OURS = "ORT int8 (lightning-quant, quantize_residuals=True)"
OURS_OV = "OpenVINO int8 (lightning-quant, quantize_residuals=True)"
#: (model, batch, variant) -> median seconds, filled by latency_rows (for the aims below the table)
MEDIANS: dict[tuple[str, int, str], float] = {}
#: the issue's ceilings, measured here with hand-tuned flows: (model, batch, runtime) -> speed-up over that
#: runtime's own fp32
CEILINGS = {
    ("ResNet-20", 64, "ORT"): 1.9,
    ("torchvision ResNet-18", 16, "ORT"): 3.45,
    ("ResNet-20", 64, "OpenVINO"): 3.5,
}


def aims() -> list[str]:
    out = []
    for (model, batch, runtime), ceiling in CEILINGS.items():
        ours_key = OURS if runtime == "ORT" else OURS_OV
        fp32, mine = MEDIANS.get((model, batch, f"{runtime} fp32")), MEDIANS.get((model, batch, ours_key))
        if fp32 is None or mine is None:
            continue
        speedup = fp32 / mine
        verdict = "reached" if speedup >= ceiling else f"{speedup / ceiling:.1%} of it"
        out.append(
            f"- Aim: {runtime} {model} batch {batch}, ceiling {ceiling}x its own fp32. Ours: {speedup:.2f}x"
            f" (ratio of medians; {verdict})."
        )
    return out


OURS_INPUTS_ONLY = "ORT int8 (lightning-quant, inputs only)"


def latency_rows(args: argparse.Namespace, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    import torchvision

    cases = [
        ("ResNet-20", lambda: resnet20(), (3, 32, 32), 1, 200 if not args.quick else 20),
        ("ResNet-20", lambda: resnet20(), (3, 32, 32), 64, 10 if not args.quick else 2),
        ("torchvision ResNet-18", lambda: torchvision.models.resnet18(), (3, 224, 224), 16, 2 if not args.quick else 1),
    ]
    rows = []
    for name, build, shape, batch, inner in cases:
        model = build().eval()
        calib = [torch.randn(8, *shape) for _ in range(4)]
        x = torch.randn(batch, *shape)
        stem = f"{name.replace(' ', '_')}_{batch}"
        fp32_path = export_float(model, x[:1], tmp / f"{stem}_fp32.onnx")
        files = {
            OURS: export_onnx(ours(build, model.state_dict(), calib, True), tmp / f"{stem}_r.onnx", x[:1]),
            OURS_INPUTS_ONLY: export_onnx(ours(build, model.state_dict(), calib, False), tmp / f"{stem}_i.onnx", x[:1]),
            "ORT int8 (peer: ORT quantize_static)": ort_quantize_static(
                fp32_path, [c.numpy() for c in calib], tmp / f"{stem}_ortq.onnx"
            ),
        }
        nncf_path = nncf_quantize(fp32_path, [c.numpy() for c in calib], tmp / f"{stem}_nncf.onnx")
        if nncf_path is not None:
            files["ORT int8 (peer: NNCF PTQ)"] = nncf_path
        feed = {"input": x.numpy()}
        sessions = {"ORT fp32": create_session(fp32_path, spin=False)}
        convs = {}
        for k, (variant, path) in enumerate(files.items()):
            optimized = tmp / f"opt{k}.onnx"
            sessions[variant] = create_session(path, optimized_model_path=optimized, spin=False)
            convs[variant] = count_conv_ops(optimized)
        runners = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        if openvino_available():
            from lightning_quant.export import create_openvino_model

            xn = x.numpy()
            for variant, path in (
                ("OpenVINO fp32", fp32_path),
                (OURS_OV, files[OURS]),
                ("OpenVINO int8 (peer: NNCF PTQ)", nncf_path),
            ):
                if path is not None:
                    compiled = create_openvino_model(path)
                    runners[variant] = lambda m=compiled, xn=xn: m(xn)
        ao_model = torch_ao_int8(build, calib, x[:1])
        if ao_model is not None:
            runners["torch fp32 (eager)"] = lambda m=model, x=x: _no_grad(m, x)
            runners["torch.ao int8 (peer: FX PTQ, x86)"] = lambda m=ao_model, x=x: _no_grad(m, x)
        times = time_variants(runners, args.rounds, inner)
        base = times["ORT fp32"]
        for variant, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
            count = f"{convs[variant][0]} / {convs[variant][0] + convs[variant][1]}" if variant in convs else ""
            MEDIANS[(name, batch, variant)] = statistics.median(ts)
            rows.append(
                f"| {name} | {batch} | {variant} | {statistics.median(ts) * 1000:.2f} | {ratio:.2f} | {count} |"
            )
        print("\n".join(rows[-len(times) :]), flush=True)
    return rows


def _no_grad(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def accuracy_rows(tmp: Path) -> list[str]:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=128, seed=0)
    dm.setup("fit")
    model = resnet8(in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    test = list(dm.test_dataloader())
    with torch.no_grad():
        fp32 = sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / sum(len(y) for _, y in test)
    rows = []
    for label, spec in [
        ("W8A8", QuantSpec(default=LayerSpec())),
        ("W8A8, quantize_residuals", QuantSpec(default=LayerSpec(), quantize_residuals=True)),
        ("W4A4 (first/last 8)", QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4))),
    ]:
        q = resnet8(in_channels=1)
        q.load_state_dict(model.state_dict())
        quantize_model(q, spec)
        calibrate(q, [x for x, _ in list(dm.train_dataloader())[:4]])
        path = export_onnx(q, tmp / f"acc_{len(rows)}.onnx", test[0][0][:1], overwrite=True)
        result = verify_onnx(q, path, test)
        rows.append(
            f"| ResNet-8 digits {label} | {fp32:.2%} | {result.torch_accuracy:.2%} | {result.onnx_accuracy:.2%} | "
            f"{result.agreement:.2%} | {result.max_abs_diff:.3g} | {result.int8_convs} / "
            f"{result.int8_convs + result.float_convs} |"
        )
        print(rows[-1], flush=True)
    return rows


#: (batch, recipe, storage) -> (file bytes, median seconds), filled by int4_rows (for the summary under the table)
INT4_FIGURES: dict[tuple[int, str, str], tuple[int, float]] = {}


def int4_summary() -> list[str]:
    out = []
    for (batch, label, storage), (size, seconds) in INT4_FIGURES.items():
        if storage != "int4" or (batch, label, "int8") not in INT4_FIGURES:
            continue
        size8, seconds8 = INT4_FIGURES[(batch, label, "int8")]
        out.append(
            f"- {label}, batch {batch}: the INT4 file is {size / size8:.2f}x the int8 file's size and takes"
            f" {seconds / seconds8:.2f}x its median latency in onnxruntime."
        )
    return out


def int4_rows(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Size and onnxruntime latency of the INT4-weight file vs the int8-weight file of W4 ResNet-20s."""
    from lightning_quant.export import model_size_report, onnx_metadata

    torch.manual_seed(0)
    rows = []
    recipes = [
        ("W4A8, quantize_residuals", LayerSpec(weight_bits=4, act_bits=8), True),
        ("W4A4", LayerSpec(weight_bits=4, act_bits=4), False),
    ]
    for batch, inner in ((1, 200 if not args.quick else 20), (64, 10 if not args.quick else 2)):
        model = resnet20().eval()
        x = torch.randn(batch, 3, 32, 32)
        fp32_path = export_float(model, x[:1], tmp / f"int4_fp32_{batch}.onnx")
        feed = {"input": x.numpy()}
        fp32_session = create_session(fp32_path, spin=False)
        runners = {"ORT fp32": (lambda s=fp32_session, f=feed: s.run(None, f))}
        info: dict[str, tuple[str, int, int | None, int, float]] = {}
        checks = [torch.randn(64, 3, 32, 32) for _ in range(4)]
        for label, layer, residuals in recipes:
            q = quantize_model(
                resnet20().eval(), QuantSpec(default=layer, first_last_bits=None, quantize_residuals=residuals)
            )
            q.load_state_dict(model.state_dict(), strict=False)
            calibrate(q, [torch.randn(8, 3, 32, 32) for _ in range(4)])
            for storage in ("int8", "int4"):
                path = export_onnx(q, tmp / f"int4_{label[:4]}_{storage}_{batch}.onnx", x[:1], weight_storage=storage)
                optimized = tmp / f"int4_opt_{label[:4]}_{storage}_{batch}.onnx"
                session = create_session(path, optimized_model_path=optimized, spin=False)
                int8, flt, _ = count_conv_ops(optimized)
                variant = f"ORT, {label}, {storage} weights"
                INT4_FIGURES[(batch, label, storage)] = (path.stat().st_size, 0.0)
                runners[variant] = lambda s=session, f=feed: s.run(None, f)
                packed = onnx_metadata(path).get("lightning_quant.packed_bytes", "None")
                agreement = verify_onnx(q, path, checks).agreement
                info[variant] = (
                    f"{int8} / {int8 + flt}",
                    path.stat().st_size,
                    None if packed == "None" else int(packed),
                    model_size_report(q).total_bytes,
                    agreement,
                )
                if openvino_available():
                    from lightning_quant.export import create_openvino_model

                    compiled = create_openvino_model(path)
                    runners[f"OpenVINO, {label}, {storage} weights"] = lambda m=compiled, xn=feed["input"]: m(xn)
        times = time_variants(runners, args.rounds, inner)
        base = times["ORT fp32"]
        for variant, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
            convs, size, packed, payload, agreement = info.get(variant, ("", 0, None, 0, float("nan")))
            size_cell = f"{size / 1024:.1f}" if size else ""
            packed_cell = f"{packed / 1024:.1f} ({payload / 1024:.1f})" if packed else ""
            agree_cell = f"{agreement:.2%}" if variant in info else ""
            for key, (size_bytes, _) in list(INT4_FIGURES.items()):
                if key[0] == batch and variant == f"ORT, {key[1]}, {key[2]} weights":
                    INT4_FIGURES[key] = (size_bytes, statistics.median(ts))
            rows.append(
                f"| ResNet-20 | {batch} | {variant} | {size_cell} | {packed_cell} |"
                f" {statistics.median(ts) * 1000:.2f} | {ratio:.2f} | {convs} | {agree_cell} |"
            )
        print("\n".join(rows[-len(times) :]), flush=True)
    return rows


def int4_section(lat: list[str], load_before: float, load_after: float) -> str:
    return "\n".join(
        [
            SECTION_INT4,
            "",
            "W4 ResNet-20 (every layer's weights 4-bit, per channel; random weights calibrated on 4 random batches)"
            ' exported twice with `export_onnx`: `weight_storage="int8"` (opset 18) and `"int4"` (INT4'
            " `DequantizeLinear` initializers, opset 21). `file KiB` is the ONNX file; `packed KiB` the file"
            " `save_packed_model` writes for the same model (codes at their widths, plus a JSON header that holds"
            " the per-layer spec), in brackets its payload without the header (`model_size_report(...).total_bytes`)."
            " Latency as in the section above (interleaved rounds, medians, ratio to ORT fp32"
            " of the same float weights); `int8 convs` = `QLinearConv` / all convs in onnxruntime's optimised"
            " graph; `agreement` = top-1 agreement of the file in onnxruntime with the PyTorch fake-quant model on"
            " 256 random inputs.",
            "",
            "```",
            "python benchmarks/export_latency.py --only int4",
            "```",
            "",
            f"Machine: {platform.processor() or 'AMD EPYC'}, {os.cpu_count()} CPUs, **shared with other jobs while"
            f" measured** (load average {load_before:.2f} before, {load_after:.2f} after: latencies are noisy and"
            f" slower than on an idle machine; compare ratios within a round), torch {torch.__version__},"
            f" onnxruntime {ort.__version__}; measured {datetime.date.today()}.",
            "",
            "| model | batch | variant | file KiB | packed KiB | median ms | × fp32 speed | int8 convs | agreement |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
            *lat,
            "",
            *int4_summary(),
            "",
            "onnxruntime 1.32 runs INT4/UINT4 `DequantizeLinear` weights exactly but does not fuse them into"
            " `QLinearConv`: with INT4 weights every conv runs in float after dequantizing its weights at each run"
            " (`int8 convs` 0). A model whose convs could run in int8 (W4A8 with residual quantizers) therefore"
            " loses its int8 speed-up with INT4 storage; a model whose convs run in float anyway (activations"
            " below 8 bits) pays only the dequantization. That is the rule of"
            ' `export_onnx(..., weight_storage="auto", prefer="speed")`: int8 weights for int8-ready models, INT4'
            ' otherwise; `prefer="size"` (the default) stores INT4 wherever a weight grid fits 4 bits.',
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--only", choices=("all", "int4"), default="all", help="int4: only the INT4 section")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_dir:
        int4 = int4_rows(args, Path(tmp_dir))
    load_after = os.getloadavg()[0]
    section = int4_section(int4, load_before, load_after)
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION_INT4, section)
    if args.only == "int4":
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        acc = accuracy_rows(tmp)
        lat = latency_rows(args, tmp)
    load_after = os.getloadavg()[0]
    ov = "OpenVINO not installed (optional extra `openvino`): no OpenVINO lines." if not openvino_available() else ""
    if openvino_available():
        import openvino

        ov = f"OpenVINO {openvino.__version__}."
    section = "\n".join(
        [
            SECTION,
            "",
            "W8A8 models exported with `export_onnx` (BatchNorm folded, per-channel int8 weights, uint8 activations)"
            " and run by onnxruntime (`ORT_ENABLE_ALL`, 2 intra-op threads, no spin-waiting) next to the float model"
            " exported by"
            " `torch.onnx.export`. Rounds interleaved (order rotated each round); latency = median over rounds;"
            " ratio = median per-round fp32/variant (> 1 means faster than fp32). `int8 convs` counts"
            " `QLinearConv` / all convs in onnxruntime's optimised graph. Random weights (latency does not depend"
            " on them), calibrated on 4 random batches. Peers quantize the same float weights post-training on the"
            " same batches: ORT `quantize_static` (QDQ, per-channel, U8S8, after `quant_pre_process`), NNCF"
            " `nncf.quantize` on the float ONNX graph (run by ORT and by OpenVINO), and torch.ao FX-mode PTQ"
            " (`prepare_fx`/`convert_fx`, x86 backend) run in PyTorch next to the float eager model. OpenVINO"
            " lines use `INFERENCE_PRECISION_HINT=f32`, 2 threads; ratios are always to ORT fp32.",
            "",
            "```",
            "python benchmarks/export_latency.py",
            "```",
            "",
            f"Machine: {platform.processor() or 'AMD EPYC'}, {os.cpu_count()} CPUs, torch {torch.__version__},"
            f" onnxruntime {ort.__version__}, Python {sys.version.split()[0]}; measured {datetime.date.today()}"
            f" (load average {load_before:.2f} before, {load_after:.2f} after). {ov}",
            "",
            "| model | batch | variant | median ms | × fp32 speed | int8 convs |",
            "|---|---:|---|---:|---:|---:|",
            *lat,
            "",
            *aims(),
            "",
            "Accuracy (digits test split, 360 images; ResNet-8 trained 6 float epochs, quantized and calibrated on"
            " 4 batches, no QAT):",
            "",
            "| model | fp32 PyTorch | fake-quant PyTorch | onnxruntime | top-1 agreement | max logit diff |"
            " int8 convs |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *acc,
            "",
            "Why `quantize_residuals=True` is the deployment recipe: without it the models quantize only the"
            " *inputs* of Conv/Linear layers, so a conv that feeds a residual `Add` (and the stem, whose output"
            " also enters the first identity shortcut) has no QuantizeLinear after it and onnxruntime cannot"
            " form `DQ -> Conv -> Q` (`QLinearConv`): those convs run in float between Q/DQ pairs. With it the"
            " BatchNorm after each such conv quantizes its output (after folding, the quantizer sits right"
            " behind the conv), and the ReLU after each addition (and the stem's ReLU and max-pooling) quantizes"
            " its output with the same quantizer as the layers it feeds, so the additions run as `QLinearAdd`"
            " and pooling in int8, as in the peers' graphs. torchvision's blocks, which call one ReLU module"
            " twice, are re-traced with a ReLU per use. Below 8-bit activations the exported clamp keeps convs"
            " in float by design (exact).",
            "",
        ]
    )
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, section)


if __name__ == "__main__":
    main()
