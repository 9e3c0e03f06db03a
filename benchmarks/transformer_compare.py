"""BERT-like encoder: dynamic int8 (ours, torch.ao, ONNX Runtime's own) and 30% head/neuron pruning, in one run.

    .venv/bin/python benchmarks/transformer_compare.py [--model-dir DIR] [--threads 2] [--batch 8 --seq-len 128]

Without ``--model-dir`` the encoder is a random-weight BertConfig of MiniLM-L6's
shape (6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522), seeded, and
the sentences below are tokenized by a word-level tokenizer built here (each
word gets a fixed pseudo-random id in the vocabulary). With ``--model-dir``,
the directory's own weights and tokenizer are used; nothing is downloaded.

Measured: bytes on disk; latency at a fixed batch and sequence length (median
over interleaved rounds, all models timed in this run); fidelity as the cosine
of mean-pooled embeddings vs the fp32 model on the sentences; for pruning,
parameters, ONNX bytes, ORT latency and ORT-vs-torch agreement.

Writes benchmarks/results/transformer_compare.{md,json}.
"""

import argparse
import copy
import hashlib
import io
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType
from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
from torch import nn

import deepshrink.transformers as dt
from deepshrink.compress.quant.dynamic import DynamicQuant, parameter_count, quantize_dynamic
from deepshrink.core.methods import Context, apply_method
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.evaluate.fidelity import fidelity
from deepshrink.evaluate.latency import time_callable
from deepshrink.report import Column, markdown_table, print_table

RESULTS = Path(__file__).parent / "results"
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


def load(args) -> tuple[nn.Module, object, str]:
    if args.model_dir:
        return dt.load_encoder(args.model_dir), dt.load_tokenizer(args.model_dir), f"{args.model_dir} (local weights)"
    config = dt.bert_config(args.vocab, args.hidden, args.layers, args.heads, args.intermediate)
    name = f"random-weight BertConfig(layers={args.layers}, hidden={args.hidden}, heads={args.heads}, ffn={args.intermediate}, vocab={args.vocab}), seed {args.seed}"
    return dt.load_encoder(config, seed=args.seed), word_tokenizer(SENTENCES, args.vocab), name


def latency_batch(vocab_size: int, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab_size, (batch, seq_len), generator=g),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
    }


# -- measurements -----------------------------------------------------------------------------
def torch_runner(model: nn.Module, batch) -> callable:
    def run():
        with torch.inference_mode():
            model(**batch)

    return run


def ort_runner(session, batch) -> callable:
    from deepshrink.transformers.export import ort_feed

    feed = ort_feed(session, batch)
    return lambda: session.run(None, feed)


def interleaved_latency(runners: dict[str, callable], repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, p90) ms per runner: ``rounds`` rounds of ``repeats`` runs each, the runners taking turns."""
    per_round: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            per_round[key].append(time_callable(fn, repeats, warmup=3))
    return {k: (statistics.median(m for m, _ in v), statistics.median(p for _, p in v)) for k, v in per_round.items()}


def torch_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def session(proto: bytes, threads: int):
    """An ORT session whose idle threads sleep instead of spinning: many sessions and torch share 2 cores here."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])


def pooled_ort(proto: bytes, batches, threads: int) -> torch.Tensor:
    return dt.ort_pooled(session(proto, threads), batches)


def ort_peer(fp32: bytes, per_channel: bool) -> bytes:
    """ONNX Runtime's own quantize_dynamic (int8 weights, its defaults otherwise)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
        return dst.read_bytes()


def quantization_rows(model, batches, reference, args) -> tuple[list[dict], dict]:
    threads = args.threads
    fp32 = dt.encoder_onnx_bytes(model)
    plain = quantize_dynamic(model, DynamicQuant())
    start = time.perf_counter()
    fallback_model, found = dt.quantize_with_fallback(model, batches)
    fallback_seconds = time.perf_counter() - start
    strict_model, strict = dt.quantize_with_fallback(model, batches, mean_target=args.strict_mean, sensitivity=found.sensitivity)
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    protos = {
        "ours": dt.encoder_dynamic_onnx(fallback_model),
        "ours_plain": dt.encoder_dynamic_onnx(plain),
        "ours_s8": dt.encoder_dynamic_onnx(fallback_model, weight_type="int8"),
        "ours_strict": dt.encoder_dynamic_onnx(strict_model),
        "ort": ort_peer(fp32, per_channel=False),
        "ort_pc": ort_peer(fp32, per_channel=True),
    }
    for proto in [fp32, *protos.values()]:
        onnx.checker.check_model(onnx.load_from_string(proto), full_check=True)
    lat_batch = latency_batch(int(model.config.vocab_size), args.batch, args.seq_len, args.seed)
    sessions = {"fp32": session(fp32, threads), **{k: session(v, threads) for k, v in protos.items()}}
    runners = {"torch_fp32": torch_runner(model, lat_batch), "torch_ao": torch_runner(ao, lat_batch)}
    runners.update({f"ort_{k}": ort_runner(s, lat_batch) for k, s in sessions.items() if k in ("fp32", "ours", "ours_s8", "ort", "ort_pc")})
    latency = interleaved_latency(runners, args.repeats, args.rounds)

    def fid(pooled: torch.Tensor) -> dict:
        return fidelity(reference, pooled, agreement=False).to_dict()

    fp32_bytes = len(fp32)
    rows = [
        row("torch fp32", "torch", torch_bytes(model), None, latency["torch_fp32"], fid(reference)),
        row(
            "torch.ao quantize_dynamic (qint8, per-tensor)",
            "torch",
            torch_bytes(ao),
            None,
            latency["torch_ao"],
            fid(dt.pooled_embeddings(ao, batches)),
        ),
        row("ONNX fp32", "ORT", fp32_bytes, fp32_bytes, latency["ort_fp32"], fid(pooled_ort(fp32, batches, threads))),
        row(
            "deepshrink dynamic int8 + fallback (u8 weights)",
            "ORT",
            len(protos["ours"]),
            fp32_bytes,
            latency["ort_ours"],
            fid(pooled_ort(protos["ours"], batches, threads)),
            torch_fidelity=fid(dt.pooled_embeddings(fallback_model, batches)),
            fallback=found.fallback,
        ),
        row(
            "deepshrink dynamic int8, no fallback",
            "ORT",
            len(protos["ours_plain"]),
            fp32_bytes,
            None,
            fid(pooled_ort(protos["ours_plain"], batches, threads)),
            torch_fidelity=fid(dt.pooled_embeddings(plain, batches)),
        ),
        row(
            "deepshrink dynamic int8 + fallback, s8 weights",
            "ORT",
            len(protos["ours_s8"]),
            fp32_bytes,
            latency["ort_ours_s8"],
            fid(pooled_ort(protos["ours_s8"], batches, threads)),
        ),
        row(
            f"deepshrink dynamic int8, stricter fallback (mean >= {args.strict_mean})",
            "ORT",
            len(protos["ours_strict"]),
            fp32_bytes,
            None,
            fid(pooled_ort(protos["ours_strict"], batches, threads)),
            torch_fidelity=fid(dt.pooled_embeddings(strict_model, batches)),
            fallback=strict.fallback,
        ),
        row(
            "onnxruntime quantize_dynamic (QInt8, per-tensor)",
            "ORT",
            len(protos["ort"]),
            fp32_bytes,
            latency["ort_ort"],
            fid(pooled_ort(protos["ort"], batches, threads)),
        ),
        row(
            "onnxruntime quantize_dynamic (QInt8, per-channel)",
            "ORT",
            len(protos["ort_pc"]),
            fp32_bytes,
            latency["ort_ort_pc"],
            fid(pooled_ort(protos["ort_pc"], batches, threads)),
        ),
    ]
    extra = {"fallback": found.to_dict(), "fallback_seconds": fallback_seconds, "strict_fallback": strict.to_dict()}
    return rows, extra


def row(method, backend, disk_bytes, fp32_bytes, latency, fidelity, **extra) -> dict:
    return {
        "method": method,
        "backend": backend,
        "disk_bytes": disk_bytes,
        "ratio": None if fp32_bytes is None else fp32_bytes / disk_bytes,
        "latency_ms": None if latency is None else latency[0],
        "latency_p90_ms": None if latency is None else latency[1],
        "cos_mean": fidelity["cosine_mean"],
        "cos_min": fidelity["cosine_min"],
        **extra,
    }


def pruning_rows(model, batches, reference, args) -> list[dict]:
    threads = args.threads
    distill = dt.Distill(steps=args.distill_steps, lr=1e-4, seed=args.seed) if args.distill_steps else None
    cfg = dt.TransformerPrune(heads=args.prune, neurons=args.prune, importance="activation", distill=distill)
    start = time.perf_counter()
    pruned = apply_method(model, cfg, Context(batches=batches, progress=False))
    seconds = time.perf_counter() - start
    pruned_q, found = dt.quantize_with_fallback(pruned, batches)
    protos = {
        "unpruned": dt.encoder_onnx_bytes(model),
        "pruned": dt.encoder_onnx_bytes(pruned),
        "pruned_int8": dt.encoder_dynamic_onnx(pruned_q),
    }
    lat_batch = latency_batch(int(model.config.vocab_size), args.batch, args.seq_len, args.seed)
    sessions = {k: session(v, threads) for k, v in protos.items()}
    latency = interleaved_latency({k: ort_runner(s, lat_batch) for k, s in sessions.items()}, args.repeats, args.rounds)
    rows = []
    shapes = {"heads": dt.head_counts(pruned), "ffn": dt.ffn_sizes(pruned)}  # the int8 model's projections are no longer nn.Linear
    for key, torch_model, label in (
        ("unpruned", model, "unpruned fp32"),
        (
            "pruned",
            pruned,
            f"heads + FFN neurons -{args.prune:.0%} (activation importance{f', {args.distill_steps} distillation steps' if distill else ''})",
        ),
        ("pruned_int8", pruned_q, "pruned, then dynamic int8 + fallback"),
    ):
        ort_pooled = dt.ort_pooled(sessions[key], batches)
        rows.append(
            {
                "method": label,
                "params": parameter_count(torch_model),
                "heads": dt.head_counts(model) if key == "unpruned" else shapes["heads"],
                "ffn": dt.ffn_sizes(model) if key == "unpruned" else shapes["ffn"],
                "onnx_bytes": len(protos[key]),
                "ort_latency_ms": latency[key][0],
                "ort_vs_torch_cos_min": fidelity(dt.pooled_embeddings(torch_model, batches), ort_pooled, agreement=False).cosine_min,
                "cos_mean": fidelity(reference, ort_pooled, agreement=False).cosine_mean,
                "cos_min": fidelity(reference, ort_pooled, agreement=False).cosine_min,
                "seconds": seconds if key == "pruned" else None,
                "fallback": found.fallback if key == "pruned_int8" else None,
            }
        )
    return rows


QUANT_COLUMNS = [
    Column("method", lambda r: r["method"]),
    Column("runs in", lambda r: r["backend"]),
    Column("disk MB", lambda r: r["disk_bytes"] / 1e6, "{:.2f}"),
    Column("vs ONNX fp32", lambda r: r["ratio"], "{:.2f}x"),
    Column("latency ms", lambda r: r["latency_ms"], "{:.1f}"),
    Column("cosine mean", lambda r: r["cos_mean"], "{:.5f}"),
    Column("cosine min", lambda r: r["cos_min"], "{:.5f}"),
    Column("fp32 layers", lambda r: None if r.get("fallback") is None else len(r["fallback"])),
]
PRUNE_COLUMNS = [
    Column("model", lambda r: r["method"]),
    Column("params", lambda r: r["params"], "{:,}"),
    Column("heads/layer", lambda r: r["heads"][0]),
    Column("FFN/layer", lambda r: r["ffn"][0]),
    Column("ONNX MB", lambda r: r["onnx_bytes"] / 1e6, "{:.2f}"),
    Column("ORT ms", lambda r: r["ort_latency_ms"], "{:.1f}"),
    Column("ORT vs torch cos min", lambda r: r["ort_vs_torch_cos_min"], "{:.6f}"),
    Column("cosine mean vs fp32", lambda r: r["cos_mean"], "{:.4f}"),
    Column("cosine min vs fp32", lambda r: r["cos_min"], "{:.4f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="a local Hugging Face model directory (weights + tokenizer)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="latency batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="latency sequence length")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--prune", type=float, default=0.3, help="fraction of heads and FFN neurons removed")
    parser.add_argument("--distill-steps", type=int, default=0)
    parser.add_argument("--strict-mean", type=float, default=0.99999, help="a stricter mean-cosine target, to show the fallback at work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, model_name = load(args)
    batches = dt.tokenize(SENTENCES, tokenizer, batch_size=16, max_length=128)
    reference = dt.pooled_embeddings(model, batches)
    quant, extra = quantization_rows(model, batches, reference, args)
    prune = pruning_rows(model, batches, reference, args)
    ours = quant[3]
    acceptance = {
        "ours_vs_onnx_fp32_size": ours["ratio"],
        "size_at_least_3_5x": ours["ratio"] >= 3.5,
        "fallback_cos_mean": ours["cos_mean"],
        "fallback_cos_min": ours["cos_min"],
        "fallback_meets_0_995_and_0_98": ours["cos_mean"] >= 0.995 and ours["cos_min"] >= 0.98,
        "pruned_params_fraction": prune[1]["params"] / prune[0]["params"],
        "pruned_onnx_fraction": prune[1]["onnx_bytes"] / prune[0]["onnx_bytes"],
        "pruned_runs_in_ort": prune[1]["ort_vs_torch_cos_min"] > 0.9999,
    }
    env = environment()
    env["versions"].update({p: version(p) for p in ("transformers", "tokenizers")})
    setup = {
        "model": model_name,
        "texts": len(SENTENCES),
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "threads": args.threads,
        "latency_batch": [args.batch, args.seq_len],
        "repeats": args.repeats,
        "rounds": args.rounds,
        "wall_s": time.perf_counter() - started,
    }
    print_table(quant, QUANT_COLUMNS, title="dynamic int8")
    print_table(prune, PRUNE_COLUMNS, title=f"pruning {args.prune:.0%}")
    print(json.dumps(acceptance, indent=2))
    write(quant, prune, extra, acceptance, env, setup)


def write(quant, prune, extra, acceptance, env, setup) -> None:
    fallback = extra["fallback"]["fallback"]
    strict = extra["strict_fallback"]["fallback"]
    header = (
        "# Transformer compression: dynamic int8 and head/neuron pruning, side by side\n\n"
        f"Model: {setup['model']}. Fidelity: cosine of mean-pooled embeddings vs the fp32 torch model on "
        f"{setup['texts']} varied sentences ({setup['tokens']} tokens).\n"
        + describe_environment(env, setup["threads"], shared=True)
        + f"Latency: batch {setup['latency_batch'][0]} x {setup['latency_batch'][1]} tokens, median of {setup['rounds']} interleaved rounds "
        f"of {setup['repeats']} runs after warm-up, every model timed in this run.\n"
        "Reproduce: `.venv/bin/python benchmarks/transformer_compare.py`\n\n"
    )
    text = (
        header
        + "## Dynamic int8\n\n"
        + markdown_table(quant, QUANT_COLUMNS)
        + f"\nSensitivity fallback (targets mean >= 0.995, min >= 0.98) kept {len(fallback)} layer(s) in fp32: {', '.join(fallback) or 'none'}"
        f" (search {extra['fallback_seconds']:.1f} s). The stricter target kept {len(strict)}: {', '.join(strict) or 'none'}.\n"
        "Torch sizes are `torch.save(state_dict)`; ONNX sizes are the files ONNX Runtime loads. "
        "`u8 weights` runs ORT's u8 x u8 kernels, which compute exactly what the torch model does; `s8 weights` runs the u8 x s8 kernels, "
        "which on x86 CPUs without VNNI add pairs of products in saturating 16-bit arithmetic.\n\n"
        + f"## Attention heads and FFN neurons, {prune[1]['method']}\n\n"
        + markdown_table(prune, PRUNE_COLUMNS)
        + "\n## Acceptance (issue 8)\n\n"
        + "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in acceptance.items())
        + "\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformer_compare.md").write_text(text)
    payload = {"environment": env, "setup": setup, "acceptance": acceptance, "quantization": quant, "pruning": prune, **extra}
    (RESULTS / "transformer_compare.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
