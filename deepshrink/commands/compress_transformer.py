"""``deepshrink compress <Hugging Face model dir> --recipe transformer-int8``: a recipe's transformer steps
on a BERT-like encoder; writes the compressed model's ONNX and a before/after report (pooled-embedding
fidelity, ORT latency) in ``--out``, all files only once everything is measured."""

import argparse
import json
from pathlib import Path

from deepshrink.core.errors import InputError

TRANSFORMER_STEPS = ("transformer_prune", "transformer_svd", "dynamic_quant", "weight_int4")
DEFAULT_SAMPLES = 256  # sentences of the Python reference (shipped with the interpreter) when no --texts


def is_model_dir(source: str) -> bool:
    return Path(source).is_dir() and (Path(source) / "config.json").is_file()


def check_steps(recipe) -> None:
    """Fail before loading anything when a step has no transformer form."""
    for i, (kind, _) in enumerate(recipe.steps):
        if kind not in TRANSFORMER_STEPS:
            raise InputError(f"recipe {recipe.name}: steps[{i}].{kind} does not run on a transformer; use {', '.join(TRANSFORMER_STEPS)}")


def token_batches(args: argparse.Namespace, config, texts: list[str] | None) -> tuple[list, str]:
    """Batches of ``texts`` (read from ``--texts``) or of the Python reference sentences, tokenized with the directory's tokenizer."""
    from deepshrink.transformers import load_tokenizer, tokenize
    from deepshrink.transformers.checks import check_text_lengths, check_tokenizer, max_tokens
    from deepshrink.transformers.retrieval import python_docs_sentences

    source = Path(args.model)
    if texts is not None:
        data = args.texts
    else:
        texts = python_docs_sentences()[: args.samples]
        data = f"{len(texts)} sentences of the Python language reference (pydoc_data.topics)"
    tokenizer = load_tokenizer(source / "tokenizer.json" if (source / "tokenizer.json").is_file() else source)
    check_tokenizer(tokenizer, config)
    if args.texts is not None:  # the default sentences are cut at --max-length instead
        check_text_lengths(texts, tokenizer, config)
    return tokenize(texts, tokenizer, args.batch_size, max_tokens(args.max_length, config)), data


def apply_steps(model, recipe, batches):
    """Each step's registered method; the quantizing ones in their serving form (vocabulary int8, small tables fp16)."""
    from deepshrink.core.methods import Context, apply_method
    from deepshrink.transformers.serving import serving_int4, serving_int8

    serving = {"dynamic_quant": serving_int8, "weight_int4": serving_int4}
    for kind, cfg in recipe.steps:
        model = serving[kind](model, cfg) if kind in serving else apply_method(model, cfg, Context(batches=batches, progress=False))
    return model


def compress_transformer(args: argparse.Namespace, recipe) -> int:
    from deepshrink.commands.transformers import measure_sides
    from deepshrink.core.files import write_atomic
    from deepshrink.transformers import check_batches, load_encoder, read_texts
    from deepshrink.transformers.serving import serving_onnx, serving_quantized_onnx

    check_steps(recipe)
    if args.samples < 1 or args.batch_size < 1 or args.max_length < 2:
        raise InputError("--samples and --batch-size must be >= 1, --max-length >= 2")
    texts = read_texts(args.texts) if args.texts is not None else None  # a bad file fails before the model loads
    model = load_encoder(args.model)
    batches, data = token_batches(args, model.config, texts)
    batches = check_batches(batches, int(model.config.vocab_size))
    out = Path(args.out or f"runs/{recipe.name}-{Path(args.model).name}")
    compressed = apply_steps(model, recipe, batches)
    token_types = "token_type_ids" in batches[0]
    quantized = any(kind in ("dynamic_quant", "weight_int4") for kind, _ in recipe.steps)
    sides = {
        "original": (model, serving_onnx(model, token_types)),
        "compressed": (compressed, serving_quantized_onnx(compressed, token_types) if quantized else serving_onnx(compressed, token_types)),
    }
    report = measure_sides(model, sides, batches, out, args.repeats, args.threads)
    protos = report.pop("protos")
    report.update(source=str(args.model), recipe=recipe.name, data=data, steps=[{kind: cfg.to_dict()} for kind, cfg in recipe.steps])
    report["files"] = {"onnx": str(out / "model.onnx")}
    write_atomic(out / "model.onnx", protos["compressed"])
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(out / "report.md", markdown(report).encode())
    _print(report, args.json)
    return 0


def markdown(report: dict) -> str:
    from deepshrink.evaluate.compare import compare

    comparison = compare(report["before"], report["after"], tuple(report["labels"]))
    steps = ", ".join(next(iter(step)) for step in report["steps"])
    return (
        f"# {report['recipe']} on {report['source']}\n\n"
        f"Steps: {steps}. Fidelity: cosine of mean-pooled embeddings to the original model on {report['data']} "
        f"(torch and ONNX Runtime); latency: ONNX Runtime, batch {report['latency']['batch']}.\n\n" + comparison.markdown()
    )


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from deepshrink.commands.args import print_comparison
    from deepshrink.evaluate.compare import compare

    comparison = compare(report["before"], report["after"], tuple(report["labels"]))
    print_comparison(comparison, f"{report['recipe']} on {report['source']} ({report['data']})")
    print(f"wrote {report['files']['onnx']}; report: {Path(report['files']['onnx']).parent / 'report.md'}")
