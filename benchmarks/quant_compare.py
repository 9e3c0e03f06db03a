"""Quantization, ours and peers side by side in one run.

    .venv/bin/python benchmarks/quant_compare.py --part ptq   # int8 PTQ on four zoo models
    .venv/bin/python benchmarks/quant_compare.py --part qat   # resnet20: 4/2-bit, ternary, binary, mixed precision

* ptq: deepshrink PTQ (per-channel int8 weights, MSE-calibrated uint8
  activations, bias correction) exported as QDQ ONNX, vs ONNX Runtime's
  ``quantize_static`` (QDQ, per-channel, same 512 calibration images; default
  and reduce_range) vs ``torch.ao`` FX static quantization (x86 backend). All
  ONNX models are timed in interleaved rounds in this run.
* qat: resnet20 quantization-aware training (LSQ) at 4 and 2 bits, ternary
  and binary weights (8-bit activations), and mixed precision chosen from
  Fisher-weighted sensitivity under three budgets of bytes on disk (the uniform
  4-bit and 2-bit files' sizes, and 1/6 of the fp32 parameter bytes).
  Each finished configuration is saved, so a stopped run resumes.

Writes benchmarks/results/quant_compare.{md,json}.
"""

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peers import ort_quantize_static

from deepshrink.compress.quant import PTQ, QAT, MixedPrecision, save_quantized_model
from deepshrink.compress.quant.onnx_qdq import quantized_onnx_bytes
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import load_data
from deepshrink.evaluate import evaluate_accuracy
from deepshrink.evaluate.accuracy import ort_predictions
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.evaluate.latency import ort_latency_interleaved, torch_latency
from deepshrink.export import onnx_bytes, ort_session
from deepshrink.models import create_model
from deepshrink.report import Column, markdown_table, print_table
from deepshrink.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)
PTQ_MODELS = ("lenet5", "resnet20", "vgg", "mobilenetv2")
CALIB_SAMPLES = 512


def torch_preds(model, test) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(test.images[i : i + 500]).argmax(1) for i in range(0, len(test), 500)]).numpy()


def ort_quantize_static_bytes(fp32: bytes, calib: np.ndarray, reduce_range: bool) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        ort_quantize_static(src, dst, calib, reduce_range)
        return dst.read_bytes()


def torch_ao_static(model, calib: torch.Tensor):
    """torch.ao FX static int8 (x86 backend): torch's own int8 kernels."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib[:1],))
    with torch.no_grad():
        for i in range(0, len(calib), 64):
            prepared(calib[i : i + 64])
    return convert_fx(prepared)


def ptq_rows(name: str, data, threads: int, repeats: int, save_onnx: Path | None = None) -> list[dict]:
    print(f"== {name}", flush=True)
    model = create_model(name, pretrained=True).eval()
    calib = data.train.images[:CALIB_SAMPLES]
    fp32 = onnx_bytes(model, SHAPE)
    variants: dict[str, tuple[bytes, dict]] = {"fp32 (ONNX Runtime)": (fp32, {"top1_torch": evaluate_accuracy(model, data.test).top1})}
    for reduce_range in (False, True):
        start = time.perf_counter()
        cfg = PTQ(calib_samples=CALIB_SAMPLES, reduce_range=reduce_range)
        qmodel = apply_method(model, cfg, Context(data, progress=False))
        seconds = time.perf_counter() - start
        preds = torch_preds(qmodel, data.test)
        extra = {"top1_torch": 100.0 * float((preds == data.test.labels.numpy()).mean()), "seconds": seconds, "torch_preds": preds}
        label = "deepshrink PTQ int8" + (" reduce_range" if reduce_range else "")
        variants[label] = (quantized_onnx_bytes(qmodel, SHAPE), extra)
    for reduce_range in (False, True):
        start = time.perf_counter()
        proto = ort_quantize_static_bytes(fp32, calib.numpy(), reduce_range)
        label = "ORT quantize_static" + (" reduce_range" if reduce_range else "")
        variants[label] = (proto, {"seconds": time.perf_counter() - start})
    if save_onnx is not None:  # for timing the same files again, here or on another CPU (ort_speed_files.py)
        save_onnx.mkdir(parents=True, exist_ok=True)
        for label, (proto, _) in variants.items():
            (save_onnx / f"{name}-{label.split(' (')[0].replace(' ', '_')}.onnx").write_bytes(proto)
    rows = []
    sessions = {}
    for label, (proto, extra) in variants.items():
        session = ort_session(proto, threads)
        preds = ort_predictions(session, data.test).numpy()
        top1 = 100.0 * float((preds == data.test.labels.numpy()).mean())
        row = {"model": name, "method": label, "top1": top1, "onnx_bytes": len(proto), "seconds": extra.get("seconds")}
        if "top1_torch" in extra:
            row["top1_torch"] = extra["top1_torch"]
        if "torch_preds" in extra:
            row["torch_ort_agreement"] = float((extra["torch_preds"] == preds).mean())
        rows.append(row)
        sessions[label] = session
    for batch in (64, 1):
        for label, (median, p90) in ort_latency_interleaved(sessions, SHAPE, batch, repeats).items():
            row = next(r for r in rows if r["method"] == label)
            row[f"ort_b{batch}_ms"], row[f"ort_b{batch}_p90_ms"] = median, p90
    rows.append(torch_ao_row(name, model, calib, data, repeats))
    base = rows[0]
    for row in rows:
        row["top1_drop_pp"] = base["top1"] - row["top1"]
        if row.get("ort_b64_ms"):
            row["ort_b64_speedup"] = base["ort_b64_ms"] / row["ort_b64_ms"]
    return rows


def torch_ao_row(name: str, model, calib, data, repeats: int) -> dict:
    row = {"model": name, "method": "torch.ao FX static int8 (x86)"}
    try:
        start = time.perf_counter()
        peer = torch_ao_static(model, calib)
        row["seconds"] = time.perf_counter() - start
    except Exception as exc:  # a peer's failure is a result to report, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    row["top1"] = evaluate_accuracy(peer, data.test).top1
    row["torch_b64_ms"] = torch_latency(peer, SHAPE, 64, repeats).median_ms
    row["torch_fp32_b64_ms"] = torch_latency(model, SHAPE, 64, repeats).median_ms
    return row


# -- QAT -------------------------------------------------------------------------


MIXED_SETUP = {"mixed_budget": "bytes on disk", "sensitivity": "fisher"}  # older mixed rows are re-run


def qat_configs(epochs: int, lr: float) -> dict[str, object]:
    """The acceptance lines' configs. A mixed-precision entry names the uniform row whose
    bytes on disk are its budget; mixed precision at 1/6 comes last (its pass is the slowest)."""
    train = TrainConfig(epochs=epochs, lr=lr, schedule="cosine", weight_decay=0.0)
    return {
        "QAT LSQ w4a8": QAT(weight_bits=4, finetune=train),
        "QAT LSQ w2a8": QAT(weight_bits=2, finetune=train),
        "mixed precision, size of uniform w4": "QAT LSQ w4a8",
        "mixed precision, size of uniform w2": "QAT LSQ w2a8",
        "QAT ternary (TWN) a8": QAT(weight_quantizer="ternary", finetune=train),
        "QAT binary (BWN) a8": QAT(weight_quantizer="binary", finetune=train),
        "mixed precision, 1/6 of fp32": MixedPrecision(size_fraction=1 / 6, qat=QAT(finetune=train)),
    }


def qat_row(label: str, model, qmodel, data, threads: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        packed = save_quantized_model(qmodel, Path(tmp) / "model.safetensors")
    proto = quantized_onnx_bytes(qmodel, SHAPE)
    preds = ort_predictions(ort_session(proto, threads), data.test).numpy()
    top1_ort = 100.0 * float((preds == data.test.labels.numpy()).mean())
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    row = {
        "model": "resnet20",
        "method": label,
        "top1_torch": evaluate_accuracy(qmodel, data.test).top1,
        "top1": top1_ort,
        "torch_ort_agreement": float((torch_preds(qmodel, data.test) == preds).mean()),
        "packed_bytes": packed,
        "fp32_param_bytes": fp32_bytes,
        "size_fraction": packed / fp32_bytes,
        "onnx_bytes": len(proto),
        "seconds": seconds,
    }
    if hasattr(qmodel, "bit_plan"):
        row["bit_plan"] = qmodel.bit_plan
    return row


def run_qat(data, threads: int, epochs: int, lr: float, previous: list[dict]) -> list[dict]:
    """QAT rows, reusing those of an earlier, interrupted run with the same set-up."""
    setup = {"epochs": epochs, "lr": lr, "train_images": len(data.train), "average_pool": "quantized"}  # older rows re-run
    configs = qat_configs(epochs, lr)
    setups = {label: {**setup, **MIXED_SETUP} if label.startswith("mixed") else setup for label in configs}
    done = {r["method"]: r for r in previous if r.get("setup") == setups.get(r["method"])}
    model = create_model("resnet20", pretrained=True)
    for label, cfg in configs.items():
        if label in done:
            continue
        if isinstance(cfg, str):  # mixed precision in the bytes that uniform row takes on disk
            cfg = MixedPrecision(done[cfg]["size_fraction"], qat=configs["mixed precision, 1/6 of fp32"].qat)
        print(f"== {label}", flush=True)
        start = time.perf_counter()
        qmodel = apply_method(model, cfg, Context(data, progress=False))
        done[label] = {**qat_row(label, model, qmodel, data, threads, time.perf_counter() - start), "setup": setups[label]}
        print(json.dumps({k: v for k, v in done[label].items() if k != "bit_plan"}), flush=True)
        save_json({"qat": list(done.values())})
    base = evaluate_accuracy(model, data.test).top1
    for row in done.values():
        row["top1_drop_pp"] = base - row["top1"]
    return list(done.values())


# -- output ------------------------------------------------------------------------

PTQ_COLUMNS = [
    Column("model", lambda r: r["model"]),
    Column("method", lambda r: r["method"]),
    Column("Top-1 % (ORT)", lambda r: r.get("top1"), "{:.2f}"),
    Column("drop pp", lambda r: r.get("top1_drop_pp"), "{:+.2f}"),
    Column("Top-1 % (torch)", lambda r: r.get("top1_torch"), "{:.2f}"),
    Column("torch/ORT agree", lambda r: r.get("torch_ort_agreement"), "{:.4f}"),
    Column("ONNX KiB", lambda r: r["onnx_bytes"] / 1024 if r.get("onnx_bytes") else None, "{:,.1f}"),
    Column("ORT b64 ms", lambda r: r.get("ort_b64_ms"), "{:.2f}"),
    Column("speedup b64", lambda r: r.get("ort_b64_speedup"), "{:.2f}x"),
    Column("ORT b1 ms", lambda r: r.get("ort_b1_ms"), "{:.3f}"),
    Column("torch b64 ms", lambda r: r.get("torch_b64_ms"), "{:.2f}"),
    Column("note", lambda r: r.get("error", "")),
]
QAT_COLUMNS = [
    Column("method", lambda r: r["method"]),
    Column("Top-1 % (ORT int8)", lambda r: r["top1"], "{:.2f}"),
    Column("drop pp", lambda r: r.get("top1_drop_pp"), "{:+.2f}"),
    Column("Top-1 % (torch)", lambda r: r["top1_torch"], "{:.2f}"),
    Column("packed KiB", lambda r: r["packed_bytes"] / 1024, "{:,.1f}"),
    Column("of fp32", lambda r: r["size_fraction"], "{:.3f}"),
    Column("time s", lambda r: r["seconds"], "{:.0f}"),
]


def save_json(update: dict) -> dict:
    path = RESULTS / "quant_compare.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.update(update)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return payload


def write_markdown(payload: dict) -> None:
    env = payload["environment"]
    text = (
        "# Quantization, side by side (Fashion-MNIST test set, 10,000 images)\n\n"
        + describe_environment(env, payload["threads"])
        + "Calibration: the first 512 training images, for every method. Latency: ONNX Runtime, median over interleaved rounds.\n"
        "Reproduce: `.venv/bin/python benchmarks/quant_compare.py --part ptq` and `--part qat`\n\n"
    )
    if payload.get("ptq"):
        text += "## int8 post-training quantization\n\n" + markdown_table(payload["ptq"], PTQ_COLUMNS) + "\n"
    if payload.get("qat"):
        text += "## resnet20: quantization-aware training and mixed precision\n\n" + markdown_table(payload["qat"], QAT_COLUMNS) + "\n"
        for row in payload["qat"]:
            if row.get("bit_plan"):
                text += f"\n{row['method']}: bits per layer {row['bit_plan']}\n"
    (RESULTS / "quant_compare.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ptq", "qat"], required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(PTQ_MODELS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--save-onnx", type=Path, default=None, help="ptq: also write every ONNX file timed to this folder")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=0.002)
    parser.add_argument("--qat-train-subset", type=int, default=10000, help="training images for QAT (from a pretrained start)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(train_subset=args.qat_train_subset if args.part == "qat" else None)
    common = {"environment": environment(), "threads": args.threads}
    if args.part == "ptq":
        rows = [row for name in args.models.split(",") for row in ptq_rows(name, data, args.threads, args.repeats, args.save_onnx)]
        print_table(rows, PTQ_COLUMNS, title="int8 PTQ")
        payload = save_json({**common, "ptq": rows})
    else:
        previous = (
            json.loads((RESULTS / "quant_compare.json").read_text()).get("qat", []) if (RESULTS / "quant_compare.json").exists() else []
        )
        rows = run_qat(data, args.threads, args.qat_epochs, args.qat_lr, previous)
        print_table(rows, QAT_COLUMNS, title="resnet20 QAT")
        payload = save_json(
            {**common, "qat": rows, "qat_setup": {"epochs": args.qat_epochs, "lr": args.qat_lr, "train_images": len(data.train)}}
        )
    write_markdown(payload)


if __name__ == "__main__":
    main()
