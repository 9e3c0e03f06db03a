"""ONNX-in commands: evaluate an ONNX file on an .npz, restore an ONNX file from its .dsz."""

import argparse
import json

from deepshrink.commands import command


def add_commands(sub) -> None:
    p = sub.add_parser("onnx-eval", help="Top-1 of an ONNX model on an .npz (x, y) and fidelity against a reference model")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--npz", required=True, help="inputs under the graph input's name (or x for one input), optional labels y")
    p.add_argument("--reference", default=None, help="ONNX file to compare outputs with (max abs diff, cosine, top-1 agreement)")
    p.add_argument("--output", default=None, help="the graph output to lead with (default: the worst one that depends on weights)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("onnx-unpack", help="restore the ONNX model packed in a .dsz archive")
    p.add_argument("archive", help=".dsz written by compressing an ONNX model")
    p.add_argument("--out", required=True, help="ONNX file to write")


@command("onnx-eval")
def _onnx_eval(args: argparse.Namespace) -> int:
    from deepshrink.onnx_in import evaluate_onnx

    result = evaluate_onnx(args.model, args.npz, args.reference, args.threads, args.output)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: {result['samples']:,} samples")
    if "top1" in result:
        print(f"Top-1 {result['top1']:.2f}% (output {result['top1_output']})")
    if "fidelity" in result:
        f = result["fidelity"]
        agreement = "-" if f["top1_agreement"] is None else f"{f['top1_agreement']:.2f}%"
        print(
            f"vs {args.reference}, output {result['fidelity_output']}: max abs diff {f['max_abs_diff']:.3g}, cosine mean {f['cosine_mean']:.6f} (min {f['cosine_min']:.6f}), top-1 agreement {agreement}"
        )
    return 0


@command("onnx-unpack")
def _onnx_unpack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepshrink.core.errors import InputError
    from deepshrink.onnx_in import save_onnx, unpack_onnx

    if Path(args.out).resolve() == Path(args.archive).resolve():
        raise InputError(f"{args.out}: would overwrite the archive; choose another --out")
    path = save_onnx(unpack_onnx(args.archive), args.out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
