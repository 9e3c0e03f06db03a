"""``deepshrink quantize``: PTQ, QAT (LSQ, binary, ternary) or mixed precision,
then packed low-bit weights, QDQ ONNX for ONNX Runtime and a before/after report."""

import argparse
import json
import time
from pathlib import Path

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data, print_comparison, report_header, run_folder, set_threads
from deepshrink.core.errors import DeepShrinkError
from deepshrink.core.files import write_atomic

SCHEMES = ("ptq", "qat", "binary", "ternary", "mixed")
LATENCY_BATCHES = (64, 1)


def add_commands(sub) -> None:
    p = sub.add_parser("quantize", help="quantize (PTQ, QAT, binary/ternary, mixed precision); writes packed weights, QDQ ONNX, report")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--scheme", choices=SCHEMES, default="ptq")
    p.add_argument("--bits", type=int, default=None, help="weight bits, 2-8 (default: 8 for ptq, 4 for qat)")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits (0: weights only)")
    p.add_argument("--calib-samples", type=int, default=512, help="training images used for calibration")
    p.add_argument("--observer", choices=["minmax", "moving_average", "percentile", "mse", "entropy"], default="mse")
    p.add_argument("--size-fraction", type=float, default=1 / 6, help="mixed: model size budget as a fraction of fp32")
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs (mixed: 0 stops at the calibrated plan, post-training)")
    p.add_argument("--lr", type=float, default=0.002, help="QAT peak learning rate (BN is folded: 0.01 diverges)")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="output folder (default: runs/quantize-<model>-<scheme>)")
    p.add_argument("--train-subset", type=int, default=None)
    add_data_args(p)
    p.add_argument("--repeats", type=int, default=20, help="ORT latency runs per round")
    p.add_argument("--no-progress", action="store_true")


def quant_config(args: argparse.Namespace):
    """The method config for the flags (the same objects a recipe step builds)."""
    from deepshrink.compress.quant import PTQ, QAT, MixedPrecision
    from deepshrink.train import TrainConfig

    act_bits = args.act_bits or None
    if args.scheme == "ptq":
        return PTQ(
            weight_bits=args.bits or 8, activation_bits=act_bits, activation_observer=args.observer, calib_samples=args.calib_samples
        )
    post_training = args.scheme == "mixed" and args.epochs == 0
    if args.epochs < 1 and not post_training:
        raise DeepShrinkError(f"--epochs must be >= 1 for --scheme {args.scheme}, got {args.epochs}")
    train = TrainConfig(epochs=max(args.epochs, 1), lr=args.lr, schedule="cosine", weight_decay=0.0, threads=args.threads)
    quantizer = {"qat": "lsq", "binary": "binary", "ternary": "ternary", "mixed": "lsq"}[args.scheme]
    qat = QAT(
        weight_bits=args.bits or 4, activation_bits=act_bits, weight_quantizer=quantizer, calib_samples=args.calib_samples, finetune=train
    )
    if args.scheme == "mixed":
        return MixedPrecision(size_fraction=args.size_fraction, qat=qat, train=not post_training)
    return qat


@command("quantize")
def _quantize(args: argparse.Namespace) -> int:

    from deepshrink.core.methods import Context, apply_method
    from deepshrink.models import resolve_model

    cfg = quant_config(args)  # before any loading: a bad flag fails at once
    set_threads(args)
    model = resolve_model(args.model, args.weights).eval()
    data = load_data(args, train_subset=args.train_subset)
    out = Path(run_folder(args, "quantize", args.model, args.scheme))
    start = time.perf_counter()
    qmodel = apply_method(model, cfg, Context(data, progress=not args.no_progress))
    seconds = time.perf_counter() - start
    report, comparison = _report(model, qmodel, cfg, data, out, args)
    report["quantize_time_s"] = seconds
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(out / "report.md", _markdown(report, comparison).encode())
    print_comparison(comparison, f"{report['model']}: {report['scheme']}")
    print(f"wrote {out / 'model.safetensors'}, {out / 'model.onnx'}, {out / 'report.json'} and {out / 'report.md'}")
    return 0


def _report(model, qmodel, cfg, data, out: Path, args: argparse.Namespace) -> tuple[dict, object]:
    """report.json's content and the fp32 / quantized comparison (Top-1 in torch and ORT, bytes, ORT latency)."""
    from deepshrink.compress.quant import save_quantized_model
    from deepshrink.compress.quant.onnx_qdq import export_quantized_onnx
    from deepshrink.evaluate import evaluate_accuracy
    from deepshrink.evaluate.accuracy import ort_top1
    from deepshrink.evaluate.compare import compare, measure_ort_latency
    from deepshrink.evaluate.size import fp32_param_bytes
    from deepshrink.export import onnx_bytes, ort_session

    out.mkdir(parents=True, exist_ok=True)
    packed = save_quantized_model(qmodel, out / "model.safetensors")
    onnx_path = export_quantized_onnx(qmodel, out / "model.onnx", data.input_shape)
    fp32_onnx = onnx_bytes(model, data.input_shape)
    sessions = {"fp32": ort_session(fp32_onnx, args.threads), "quantized": ort_session(onnx_path, args.threads)}
    sides = {
        "fp32": {"top1": evaluate_accuracy(model, data.test).top1, "bytes": fp32_param_bytes(model), "onnx_bytes": len(fp32_onnx)},
        "quantized": {"top1": evaluate_accuracy(qmodel, data.test).top1, "bytes": packed, "onnx_bytes": onnx_path.stat().st_size},
    }
    for name, session in sessions.items():
        sides[name]["top1_ort"] = ort_top1(session, data.test)
    latency = measure_ort_latency(sessions, data.input_shape, LATENCY_BATCHES, args.repeats)
    comparison = compare({**sides["fp32"], **latency["fp32"]}, {**sides["quantized"], **latency["quantized"]}, labels=("fp32", "quantized"))
    report = {
        **report_header(cfg, data, model=args.model, scheme=args.scheme),
        "threads": args.threads,
        **comparison.to_dict(),
        "layers": getattr(qmodel, "quant_report", None),
        "bit_plan": getattr(qmodel, "bit_plan", None),
        "files": {"weights": str(out / "model.safetensors"), "onnx": str(onnx_path)},
    }
    return report, comparison


def _markdown(report: dict, comparison) -> str:
    lines = [f"# {report['model']}: {report['scheme']} quantization", "", comparison.markdown().rstrip("\n")]
    if report.get("layers"):
        lines += ["", "| layer | weight bits | weight SQNR dB | output SQNR dB |", "|---|---|---|---|"]
        lines += [
            f"| {r['layer']} | {r['weight_bits']} | {r['weight_sqnr_db']:.1f} | {r['output_sqnr_db']:.1f} |" for r in report["layers"]
        ]
    if report.get("bit_plan"):
        lines += ["", "Bits per layer: " + ", ".join(f"{k} {v}" for k, v in report["bit_plan"].items())]
    return "\n".join(lines) + "\n"
