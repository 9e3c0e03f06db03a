"""``deepshrink eval``: accuracy, size, MACs/FLOPs, latency (torch and ONNX Runtime) and memory of one model."""

import argparse
import json

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: accuracy, size, MACs, latency (torch and ONNX Runtime), memory")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument(
        "--reference", default=None, help="the original model (zoo name or module:function, pretrained): agreement and compression ratio"
    )
    add_data_args(p)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--layers", action="store_true", help="also print per-layer MACs/FLOPs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from deepshrink.evaluate import evaluate
    from deepshrink.models import resolve_model
    from deepshrink.models.weights import read_manifest

    data = load_data(args)
    model = resolve_model(args.model, args.weights)
    reference = resolve_model(args.reference) if args.reference else None
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    report = evaluate(
        model,
        data.test,
        args.model,
        reference=reference,
        batch_sizes=batch_sizes,
        repeats=args.repeats,
        onnx=not args.no_onnx,
        threads=args.threads,
    )
    manifest_top1 = read_manifest().get(args.model, {}).get("test_top1") if args.weights is None else None
    if args.json:
        print(json.dumps({**report.to_dict(layers=args.layers), "manifest_top1": manifest_top1}, indent=2))
        return 0
    _print_eval_report(report, manifest_top1, args.layers)
    return 0


def _print_eval_report(report, manifest_top1: float | None, layers: bool) -> None:
    from deepshrink.report import Column, print_table

    acc, size, compute = report.accuracy, report.size, report.compute
    rows = [
        ("Top-1 / Top-5 %", f"{acc.top1:.2f} / {acc.top5:.2f}  (loss {acc.loss:.4f}, {acc.samples:,} images)"),
        ("manifest Top-1 %", "-" if manifest_top1 is None else f"{manifest_top1:.2f}  (diff {acc.top1 - manifest_top1:+.2f}pp)"),
        ("params (non-zero)", f"{size.params:,} ({size.nonzero_params:,}, sparsity {100 * size.sparsity:.1f}%)"),
        ("weight layers", f"{size.layers}"),
        ("dense fp32 / on disk / ONNX", f"{size.dense_fp32_bytes:,} / {size.disk_bytes:,} / {size.onnx_bytes or 0:,} bytes"),
        ("MACs (effective)", f"{compute.macs:,} ({compute.effective_macs:,})"),
        ("FLOPs: all / conv+linear", f"{compute.flops:,} / {compute.conv_linear_flops:,}"),
        (
            "FlopCounterMode FLOPs",
            f"{report.flop_counter_flops:,} ({'equal' if report.flop_counter_flops == compute.conv_linear_flops else 'DIFFERENT'})",
        ),
    ]
    if report.robustness:
        rows.append(("Top-1 % under input noise", report.robustness.describe()))
    if report.compression_ratio is not None:
        rows.append(("compression vs reference", f"{report.compression_ratio:.2f}x (bytes on disk)"))
    rows += [
        (f"{r.backend} batch {r.batch_size} ms", f"median {r.median_ms:.3f}, p90 {r.p90_ms:.3f} ({r.runs} runs)") for r in report.latency
    ]
    rows += [(f"peak memory {k}", f"{v / 2**20:.1f} MiB") for k, v in report.peak_memory_bytes.items()]
    if report.onnx:
        o = report.onnx
        rows.append(
            ("ORT vs torch", f"max|diff| {o.max_abs_diff:.2e}, top-1 agreement {o.top1_agreement:.2f}%, ORT Top-1 {o.test_top1:.2f}%")
        )
    env = report.environment
    rows.append(
        (
            "machine",
            f"{env['cpu']} ({', '.join(env['cpu_flags'])}), {env['torch_threads']} threads, torch {env['versions']['torch']}, ORT {env['versions']['onnxruntime']}",
        )
    )
    print_table(rows, [Column("metric", lambda r: r[0]), Column("value", lambda r: r[1])], title=f"{report.name}: evaluation")
    if layers:
        print_table(
            [layer for layer in compute.layers if layer.macs or layer.kind == "add"],
            [
                Column("layer", lambda r: r.name),
                Column("type", lambda r: r.kind),
                Column("params", lambda r: r.params, "{:,}"),
                Column("MACs", lambda r: r.macs, "{:,}"),
                Column("effective MACs", lambda r: r.effective_macs, "{:,}"),
                Column("FLOPs", lambda r: r.flops, "{:,}"),
                Column("output", lambda r: "x".join(map(str, r.output_shape))),
            ],
            title="per layer",
        )
