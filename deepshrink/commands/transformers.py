"""``deepshrink transformer``: prune heads/neurons, SVD and dynamic int8 for a BERT-like encoder
from a local directory or a config; writes fp32 and compressed ONNX and a before/after report."""

import argparse
import json
from pathlib import Path

from deepshrink.commands import command
from deepshrink.core.errors import InputError


def add_commands(sub) -> None:
    p = sub.add_parser("transformer", help="compress a BERT-like encoder (local directory or config.json): prune, SVD, dynamic int8")
    p.add_argument("source", help="model directory (weights read locally) or config.json (random weights from --seed)")
    p.add_argument("--quantize", choices=["none", "dynamic-int8"], default="none")
    p.add_argument(
        "--weight-type",
        choices=["auto", "uint8", "int8"],
        default="auto",
        help="ONNX weight storage (auto: int8 where the CPU has VNNI/AMX, else uint8)",
    )
    p.add_argument("--no-fallback", action="store_true", help="quantize every layer (no sensitivity-based fp32 fallback)")
    p.add_argument("--mean-cosine", type=float, default=0.995, help="fallback target: mean pooled-embedding cosine")
    p.add_argument("--min-cosine", type=float, default=0.98, help="fallback target: worst pooled-embedding cosine")
    p.add_argument("--prune-heads", type=float, default=0.0, help="fraction of attention heads removed per layer")
    p.add_argument("--prune-neurons", type=float, default=0.0, help="fraction of FFN neurons removed per layer")
    p.add_argument("--importance", choices=["activation", "magnitude"], default="activation")
    p.add_argument("--distill-steps", type=int, default=0, help="distillation steps from the original after pruning")
    p.add_argument("--svd-rank", type=float, default=None, help="SVD of the FFN projections keeping this fraction of the rank")
    p.add_argument("--texts", default=None, help="UTF-8 file, one text per line (needs a tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or directory (default: the model directory's)")
    p.add_argument("--samples", type=int, default=64, help="random token sequences when no texts are given")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sequence at most")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=20, help="ORT latency runs")
    p.add_argument("--out", default=None, help="output folder (default: runs/transformer-<name>)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def stage_configs(args: argparse.Namespace) -> dict:
    """The method configs for the flags, built before any loading so a bad flag fails at once."""
    from deepshrink.compress.quant.dynamic import DynamicQuant
    from deepshrink.transformers import TransformerDistill, TransformerPrune, TransformerSVD

    configs = {}
    if args.prune_heads or args.prune_neurons:
        distill = TransformerDistill(steps=args.distill_steps, seed=args.seed) if args.distill_steps else None
        configs["prune"] = TransformerPrune(heads=args.prune_heads, neurons=args.prune_neurons, importance=args.importance, distill=distill)
    elif args.distill_steps:
        raise InputError("--distill-steps repairs a pruned model: give --prune-heads or --prune-neurons too")
    if args.svd_rank is not None:
        configs["svd"] = TransformerSVD(rank_fraction=args.svd_rank)
    if args.quantize == "dynamic-int8":
        configs["quantize"] = DynamicQuant()
    if not configs:
        raise InputError("nothing to do: give --quantize, --prune-heads/--prune-neurons or --svd-rank")
    if args.batch_size < 1 or args.samples < 1 or args.max_length < 2:
        raise InputError("--batch-size and --samples must be >= 1, --max-length >= 2")
    return configs


def token_batches(args: argparse.Namespace, config) -> tuple[list, str]:
    from deepshrink.transformers import load_tokenizer, random_token_batches, read_texts, tokenize
    from deepshrink.transformers.checks import check_text_lengths, check_tokenizer, max_tokens

    vocab_size, max_length = int(config.vocab_size), max_tokens(args.max_length, config)
    if args.texts is None:
        batches = random_token_batches(vocab_size, args.samples, max(2, max_length // 4), max_length, args.batch_size, args.seed)
        return batches, f"{args.samples} random token sequences (seed {args.seed})"
    texts = read_texts(args.texts)
    source = args.tokenizer or (args.source if Path(args.source).is_dir() else None)
    if source is None:
        raise InputError("--texts needs a tokenizer: give --tokenizer (tokenizer.json or a directory)")
    tokenizer = load_tokenizer(source)
    check_tokenizer(tokenizer, config)
    check_text_lengths(texts, tokenizer, config)
    return tokenize(texts, tokenizer, args.batch_size, max_length), f"{len(texts)} texts from {args.texts}"


@command("transformer")
def _transformer(args: argparse.Namespace) -> int:
    import torch

    from deepshrink.core.files import write_atomic
    from deepshrink.core.methods import Context, apply_method
    from deepshrink.transformers import check_batches, load_encoder
    from deepshrink.transformers.fallback import quantize_with_fallback

    configs = stage_configs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_encoder(args.source, seed=args.seed)
    batches, data = token_batches(args, model.config)
    batches = check_batches(batches, int(model.config.vocab_size))
    out = Path(args.out or f"runs/transformer-{Path(args.source).stem}")  # written only once everything is measured
    compressed, stages = model, {}
    for name in ("prune", "svd"):
        if name in configs:
            compressed = apply_method(compressed, configs[name], Context(batches=batches, progress=False))
            stages[name] = configs[name].to_dict()
    if "quantize" in configs:
        if args.no_fallback:
            compressed = apply_method(compressed, configs["quantize"])
            stages["quantize"] = configs["quantize"].to_dict()
        else:
            compressed, found = quantize_with_fallback(compressed, batches, configs["quantize"], args.mean_cosine, args.min_cosine)
            stages["quantize"] = found.to_dict()
    report = measure(model, compressed, batches, out, args)
    report.update(source=str(args.source), data=data, stages=stages)
    for side, proto in report.pop("protos").items():
        write_atomic(out / f"{side}.onnx", proto)
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    print_report(report, args.json)
    return 0


def measure(original, compressed, batches, out: Path, args: argparse.Namespace) -> dict:
    """Params, ONNX bytes, pooled-embedding fidelity to the original (torch and ORT) and ORT latency, before and after."""
    from deepshrink.compress.quant.dynamic import dynamic_quant_layers
    from deepshrink.compress.quant.onnx_dynamic import cpu_weight_type
    from deepshrink.transformers import encoder_dynamic_onnx, encoder_onnx_bytes

    quantized = bool(dynamic_quant_layers(compressed))
    sides = {
        "original": (original, encoder_onnx_bytes(original)),
        "compressed": (
            compressed,
            encoder_dynamic_onnx(compressed, weight_type=cpu_weight_type() if args.weight_type == "auto" else args.weight_type)
            if quantized
            else encoder_onnx_bytes(compressed),
        ),
    }
    return measure_sides(original, sides, batches, out, args.repeats, args.threads)


def measure_sides(original, sides: dict, batches, out: Path, repeats: int, threads: int | None) -> dict:
    """``sides`` maps "original" and "compressed" to (model, ONNX bytes); each is measured against ``original``."""
    from deepshrink.compress.quant.dynamic import parameter_count
    from deepshrink.evaluate.compare import compare, latency_key
    from deepshrink.evaluate.fidelity import fidelity
    from deepshrink.evaluate.latency import time_callable
    from deepshrink.export import ort_session
    from deepshrink.transformers import ort_pooled, pooled_embeddings
    from deepshrink.transformers.export import ort_feed

    reference = pooled_embeddings(original, batches)
    batch = batches[0]["input_ids"].shape
    measured, files, protos = {}, {}, {}
    for side, (model, proto) in sides.items():
        files[side], protos[side] = str(out / f"{side}.onnx"), proto  # written by the caller once everything is measured
        session = ort_session(proto, threads)
        feed = ort_feed(session, batches[0])
        median, _ = time_callable(lambda s=session, f=feed: s.run(None, f), repeats)
        torch_fidelity = fidelity(reference, pooled_embeddings(model, batches), agreement=False)
        ort_fidelity = fidelity(reference, ort_pooled(session, batches), agreement=False)
        measured[side] = {
            "params": parameter_count(model),
            "onnx_bytes": len(proto),
            "cosine_mean": torch_fidelity.cosine_mean,
            "cosine_min": torch_fidelity.cosine_min,
            "cosine_mean_ort": ort_fidelity.cosine_mean,
            "cosine_min_ort": ort_fidelity.cosine_min,
            latency_key(batch[0]): median,
        }
    comparison = compare(measured["original"], measured["compressed"], ("original", "compressed"))
    return {
        **comparison.to_dict(),
        "fidelity_samples": torch_fidelity.samples,
        "latency": {"batch": list(batch), "repeats": repeats, "threads": threads},
        "files": files,
        "protos": protos,
    }


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from deepshrink.commands.args import print_comparison
    from deepshrink.evaluate.compare import compare

    comparison = compare(report["before"], report["after"], tuple(report["labels"]))
    print_comparison(comparison, f"{report['source']}: {', '.join(report['stages'])} on {report['data']}")
    fallback = report["stages"].get("quantize", {}).get("fallback")
    if fallback is not None:
        print(f"fp32 fallback layers: {', '.join(fallback) or 'none'}")
    print(f"wrote {report['files']['original']}, {report['files']['compressed']}")
