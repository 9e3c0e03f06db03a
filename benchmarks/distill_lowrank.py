"""Distillation, low-rank factorisation and depthwise-separable substitution, measured in one run.

    .venv/bin/python benchmarks/distill_lowrank.py [--part all|kd|svd|tucker|separable] [--threads 2]

* kd: a small student (resnet8) trained with KD from the pretrained resnet20
  against the same student trained on the labels only: same epochs, same
  seeds, same data (by default the first 10,000 training images, which keeps
  six training runs affordable on 2 cores).
* svd: truncated SVD of lenet300's and vgg's classifier layers, fine-tuned (KD
  from the original model).
* tucker: Tucker-2 of vgg's convolutions, fine-tuned with KD; ORT latency of the
  original and the factorised model timed in this run, interleaved.
* separable: vgg's convolutions replaced by depthwise-separable pairs (SVD
  init), fine-tuned with KD; conv+BN folding checked on both models.

Every finished unit (one training run, one measured model) is stored in
``--state`` as it completes, so an interrupted run resumes where it stopped;
``--redo PART`` forgets a part. Fine-tuned weights are kept beside the state,
so ``--remeasure PART`` (e.g. on a quieter machine) re-measures accuracy and
latency without re-training. Writes
benchmarks/results/distill_lowrank.{md,json} from whatever parts are done.
"""

import argparse
import copy
import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from deepshrink.compress.distill import KD, TeacherCache, finetune_with_kd
from deepshrink.compress.lowrank import Decompose, decompose_model
from deepshrink.compress.structure.fold import fold_batchnorm
from deepshrink.compress.structure.separable import Separable, substitute_separable
from deepshrink.core.config import Scope
from deepshrink.data import load_data
from deepshrink.evaluate import count_compute, evaluate_accuracy, measure_size
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.evaluate.latency import time_callable
from deepshrink.export import onnx_bytes, ort_session, run_ort, verify_onnx
from deepshrink.models import create_model
from deepshrink.models.weights import load_weights, save_weights
from deepshrink.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)
PARTS = ("kd", "svd", "tucker", "separable")
log = logging.getLogger("distill_lowrank")
CACHES: dict[str, TeacherCache] = {}  # teacher logits per pretrained teacher, shared by every part that distills from it


def digest(settings: dict) -> str:
    """A short name for a configuration, so changed settings never reuse stored results."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def teacher_cache(name: str) -> TeacherCache:
    return CACHES.setdefault(name, TeacherCache())


# -- state: one JSON of finished units, written atomically after each ---------------------
class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def forget(self, part: str, keep_training: bool = False) -> None:
        """Drop a part's results; ``keep_training`` keeps its trained weights' times, so only measuring is redone."""
        for key in [k for k in self.data if k.split("/")[0] == part]:
            if not (keep_training and key.endswith("/seconds")):
                del self.data[key]
        self.put("_", None)

    def weights(self, key: str) -> Path:
        return self.path.parent / (key.replace("/", "__") + ".safetensors")


# -- measuring -------------------------------------------------------------------------------
def conv_macs(model: nn.Module) -> int:
    return sum(layer.macs for layer in count_compute(model, SHAPE).layers if layer.kind == "Conv2d")


def measure(model: nn.Module, data) -> dict:
    model.eval()
    compute = count_compute(model, SHAPE)
    return {
        "top1": evaluate_accuracy(model, data.test).top1,
        "params": measure_size(model).params,
        "macs": compute.macs,
        "conv_macs": sum(layer.macs for layer in compute.layers if layer.kind == "Conv2d"),
    }


def ort_latencies(models: dict[str, nn.Module], threads: int, repeats: int, rounds: int = 3) -> dict[str, dict]:
    """Median ORT ms at batch 64 and 1 per model, rounds interleaved so load changes hit every model alike."""
    sessions = {name: ort_session(onnx_bytes(m, SHAPE), threads) for name, m in models.items()}
    out: dict[str, dict] = {name: {} for name in models}
    for batch in (64, 1):
        x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(0))
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, session in sessions.items():
                samples[name].append(time_callable(lambda s=session, x=x: run_ort(s, x), repeats)[0])
        for name in models:
            out[name][f"ort_b{batch}_ms"] = statistics.median(samples[name])
    for name, model in models.items():
        out[name]["onnx_max_abs_diff"] = verify_onnx(
            model, sessions[name], torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1))
        )
    return out


def timed_finetune(
    model: nn.Module, config: TrainConfig, data, teacher: nn.Module | None, kd: KD | None, cache: TeacherCache | None
) -> float:
    start = time.perf_counter()
    result = finetune_with_kd(model, config, data, teacher, kd, progress=False, cache=cache)
    seconds = time.perf_counter() - start
    log.info("  trained %d epochs in %.0fs: %s", config.epochs, seconds, [round(h.get("val_top1", 0.0), 2) for h in result.history])
    return seconds


def trained(state: State, key: str, model: nn.Module, train) -> tuple[nn.Module, float | None]:
    """Train once: reuse saved weights (training time then comes from the state) or train and save them."""
    path = state.weights(key)
    if path.exists() and state.get(key + "/seconds") is not None:
        log.info("  reusing %s", path)
        return load_weights(model, path), state.get(key + "/seconds")
    seconds = train(model)
    save_weights(model, path)
    state.put(key + "/seconds", seconds)
    return model, seconds


# -- parts -----------------------------------------------------------------------------------
def part_kd(state: State, args, full) -> dict:
    data = load_data(train_subset=args.kd_subset) if args.kd_subset else full
    teacher = create_model("resnet20", pretrained=True)
    kd = KD(temperature=args.kd_temperature, alpha=args.kd_alpha)
    cache = TeacherCache()  # this part's training set may be a subset: its own cache
    runs = []
    for seed in args.seeds:
        for arm in ("labels", "kd"):
            settings = {"student": args.student, "subset": args.kd_subset, "epochs": args.kd_epochs, "lr": args.kd_lr, "kd": kd.to_dict()}
            key = f"kd/{args.student}/{digest(settings)}/{arm}/seed{seed}"
            row = state.get(key)
            if row is None:
                log.info("kd: %s %s seed %d", args.student, arm, seed)
                torch.manual_seed(seed)
                student = create_model(args.student)
                config = TrainConfig(epochs=args.kd_epochs, lr=args.kd_lr, seed=seed, threads=args.threads)
                seconds = timed_finetune(student, config, data, teacher if arm == "kd" else None, kd if arm == "kd" else None, cache)
                row = {"arm": arm, "seed": seed, "top1": evaluate_accuracy(student, full.test).top1, "seconds": seconds}
                state.put(key, row)
            log.info("kd: %s seed %d -> %.2f%%", arm, seed, row["top1"])
            runs.append(row)
    mean = {arm: statistics.mean(r["top1"] for r in runs if r["arm"] == arm) for arm in ("labels", "kd")}
    student = create_model(args.student)
    return {
        "teacher": {"name": "resnet20", **measure(teacher, full)},
        "student": {"name": args.student, "params": measure_size(student).params, "macs": count_compute(student, SHAPE).macs},
        "config": {
            "epochs": args.kd_epochs,
            "lr": args.kd_lr,
            "train_images": len(data.train),
            "seeds": list(args.seeds),
            "kd": kd.to_dict(),
            "teacher_logits_cached": True,
        },
        "runs": runs,
        "mean_top1_labels": mean["labels"],
        "mean_top1_kd": mean["kd"],
        "gain_pp": mean["kd"] - mean["labels"],
    }


def decomposed_layer_params(records) -> tuple[int, int]:
    replaced = [r for r in records if r.replaced]
    return sum(r.params_before for r in replaced), sum(r.params_after for r in replaced)


def lowrank_case(state: State, key: str, name: str, cfg: Decompose, data, args, latency: bool) -> dict:
    """Factorise a pretrained zoo model, fine-tune with KD from the original, measure before and after."""
    original = create_model(name, pretrained=True)
    decomposed, records = decompose_model(copy.deepcopy(original), cfg)
    before_ft = measure(decomposed, data)
    log.info("%s: %s factorised %d layers, Top-1 before fine-tuning %.2f%%", key, name, sum(r.replaced for r in records), before_ft["top1"])
    decomposed, seconds = trained(
        state,
        key,
        decomposed,
        lambda m: timed_finetune(m, cfg.finetune, data, original if cfg.distill else None, cfg.distill, teacher_cache(name)),
    )
    row = {
        "model": name,
        "config": cfg.to_dict(),
        "layers": [asdict(r) for r in records],
        "original": measure(original, data),
        "decomposed_before_finetune": before_ft,
        "decomposed": measure(decomposed, data),
        "finetune_seconds": seconds,
    }
    row["decomposed_layer_params"] = dict(zip(("before", "after"), decomposed_layer_params(records), strict=True))
    if latency:
        lat = ort_latencies({"original": original, "decomposed": decomposed}, args.threads, args.repeats)
        row["original"].update(lat["original"])
        row["decomposed"].update(lat["decomposed"])
    row["top1_drop_pp"] = row["original"]["top1"] - row["decomposed"]["top1"]
    log.info("%s: Top-1 %.2f -> %.2f (drop %.2fpp)", key, row["original"]["top1"], row["decomposed"]["top1"], row["top1_drop_pp"])
    return row


def finetune_config(args, epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, schedule="cosine", weight_decay=5e-4, threads=args.threads)


def part_svd(state: State, args, data) -> dict:
    kd = KD(temperature=4.0, alpha=0.9)
    cases = {
        "lenet300": Decompose(
            method="svd",
            compression=args.svd_compression,
            scope=Scope(types=("Linear",), exclude="^5$"),  # the 100->10 output layer is already tiny
            finetune=finetune_config(args, args.svd_epochs, args.svd_lr),
            distill=kd,
        ),
        "vgg": Decompose(
            method="svd",
            compression=args.svd_compression,
            scope=Scope(types=("Linear",), include=r"^classifier\.0$"),  # 256x256; the 256->10 output layer is tiny
            finetune=finetune_config(args, args.svd_vgg_epochs, 0.005),
            distill=kd,
        ),
    }
    out = {}
    for name, cfg in cases.items():
        key = f"svd/{name}/{digest(cfg.to_dict())}"
        if state.get(key) is None:
            state.put(key, lowrank_case(state, key, name, cfg, data, args, latency=False))
        out[name] = state.get(key)
    return out


def part_tucker(state: State, args, data) -> dict:
    cfg = Decompose(
        method="tucker",
        compression=args.tucker_compression,
        round_to=args.round_to,
        scope=Scope(types=("Conv2d",), exclude=r"^features\.0$"),  # 1 input channel: nothing to factorise
        finetune=finetune_config(args, args.tucker_epochs, 0.01),
        distill=KD(temperature=4.0, alpha=0.9),
    )
    key = f"tucker/vgg/{digest(cfg.to_dict())}"
    if state.get(key) is None:
        state.put(key, lowrank_case(state, key, "vgg", cfg, data, args, latency=True))
    row = state.get(key)
    row["conv_macs_reduction"] = row["original"]["conv_macs"] / row["decomposed"]["conv_macs"]
    row["ort_b64_speedup"] = row["original"]["ort_b64_ms"] / row["decomposed"]["ort_b64_ms"]
    row["ort_b1_speedup"] = row["original"]["ort_b1_ms"] / row["decomposed"]["ort_b1_ms"]
    return row


def fold_diff(model: nn.Module, data) -> float:
    folded = fold_batchnorm(model.eval())
    x = data.test.images[:256]
    with torch.no_grad():
        return float((folded(x) - model(x)).abs().max())


def part_separable(state: State, args, data) -> dict:
    cfg = Separable(
        multiplier=1,
        scope=Scope(types=("Conv2d",), exclude=r"^features\.0$"),
        finetune=finetune_config(args, args.separable_epochs, 0.02),
        distill=KD(temperature=4.0, alpha=0.9),
    )
    key = f"separable/vgg/{digest(cfg.to_dict())}"
    if state.get(key) is None:
        original = create_model("vgg", pretrained=True)
        model, errors = substitute_separable(copy.deepcopy(original), cfg)
        before_ft = measure(model, data)
        log.info("separable: %d convs replaced, Top-1 before fine-tuning %.2f%%", len(errors), before_ft["top1"])
        model, seconds = trained(
            state, key, model, lambda m: timed_finetune(m, cfg.finetune, data, original, cfg.distill, teacher_cache("vgg"))
        )
        row = {
            "model": "vgg",
            "config": cfg.to_dict(),
            "relative_weight_error": errors,
            "original": measure(original, data),
            "separable_before_finetune": before_ft,
            "separable": measure(model, data),
            "finetune_seconds": seconds,
        }
        lat = ort_latencies({"original": original, "separable": model}, args.threads, args.repeats)
        row["original"].update(lat["original"])
        row["separable"].update(lat["separable"])
        row["fold_max_abs_diff"] = {"vgg": fold_diff(original, data), "vgg_separable": fold_diff(model, data)}
        row["top1_drop_pp"] = row["original"]["top1"] - row["separable"]["top1"]
        state.put(key, row)
    return state.get(key)


# -- report ------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{x:.2f}"


def kd_section(kd: dict) -> list[str]:
    c = kd["config"]
    lines = [
        "## Knowledge distillation: resnet20 (teacher) -> " + kd["student"]["name"],
        "",
        f"Teacher Top-1 {pct(kd['teacher']['top1'])}% ({kd['teacher']['params']:,} params, {kd['teacher']['macs'] / 1e6:.2f} MMACs); "
        f"student {kd['student']['params']:,} params, {kd['student']['macs'] / 1e6:.2f} MMACs. "
        f"Both arms: {c['epochs']} epochs on {c['train_images']:,} training images, SGD lr {c['lr']} one-cycle, same seeds; "
        f"KD: T={c['kd']['temperature']}, alpha={c['kd']['alpha']} (teacher logits computed once per image).",
        "",
        "| seed | labels only Top-1 % | KD Top-1 % | gain pp |",
        "|---|---|---|---|",
    ]
    by = {(r["arm"], r["seed"]): r["top1"] for r in kd["runs"]}
    for seed in c["seeds"]:
        lines.append(f"| {seed} | {pct(by[('labels', seed)])} | {pct(by[('kd', seed)])} | {by[('kd', seed)] - by[('labels', seed)]:+.2f} |")
    lines.append(f"| **mean** | **{pct(kd['mean_top1_labels'])}** | **{pct(kd['mean_top1_kd'])}** | **{kd['gain_pp']:+.2f}** |")
    return [*lines, ""]


def lowrank_rows(label: str, row: dict, after_key: str) -> list[str]:
    o, b, a = row["original"], row[f"{after_key}_before_finetune"], row[after_key]
    lat = " | ".join(f"{o[k]:.3f} / {a[k]:.3f}" if k in a else "-" for k in ("ort_b64_ms", "ort_b1_ms"))
    return [
        f"| {label} | {pct(o['top1'])} | {pct(b['top1'])} | {pct(a['top1'])} | {row['top1_drop_pp']:.2f} | {o['params']:,} -> {a['params']:,} "
        f"| {o['conv_macs'] / 1e6:.2f} -> {a['conv_macs'] / 1e6:.2f} | {o['macs'] / 1e6:.2f} -> {a['macs'] / 1e6:.2f} | {lat} |"
    ]


TABLE_HEAD = [
    "| model / method | original Top-1 % | before fine-tune % | after fine-tune % | drop pp | params | conv MMACs | MMACs | ORT b64 ms (orig / new) | ORT b1 ms (orig / new) |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def write_report(results: dict, env: dict, args) -> None:
    lines = [
        "# Distillation, low-rank factorisation, depthwise-separable substitution (Fashion-MNIST test set)",
        "",
        *describe_environment(env, args.threads, shared=True).splitlines(),
        "Latency: ONNX Runtime, median over 3 interleaved rounds of the median of "
        f"{args.repeats} runs after warm-up; original and compressed timed in the same run.",
        f"Reproduce: `.venv/bin/python benchmarks/distill_lowrank.py --threads {args.threads}`",
        "",
    ]
    if "kd" in results:
        lines += kd_section(results["kd"])
    if "svd" in results:
        lines += ["## Truncated SVD of classifier layers (fine-tuned with KD from the original)", "", *TABLE_HEAD]
        for name, row in results["svd"].items():
            lines += lowrank_rows(f"{name} svd", row, "decomposed")
        lines.append("")
        for name, row in results["svd"].items():
            p = row["decomposed_layer_params"]
            ranks = ", ".join(f"{r['name']}: rank {r['ranks'][0]}" for r in row["layers"] if r["replaced"])
            lines.append(
                f"- {name}: decomposed layers {p['before']:,} -> {p['after']:,} weights ({p['before'] / p['after']:.2f}x fewer; {ranks}); "
                f"Top-1 drop {row['top1_drop_pp']:.2f}pp after {row['config']['finetune']['epochs']} epochs."
            )
        lines.append("")
    if "tucker" in results:
        t = results["tucker"]
        lines += [
            "## Tucker-2 of vgg's convolutions (fine-tuned with KD from the original)",
            "",
            *TABLE_HEAD,
            *lowrank_rows("vgg tucker-2", t, "decomposed"),
        ]
        lines += [
            "",
            f"Conv MACs {t['conv_macs_reduction']:.2f}x fewer, Top-1 drop {t['top1_drop_pp']:.2f}pp after {t['config']['finetune']['epochs']} epochs; "
            f"ORT speedup {t['ort_b64_speedup']:.2f}x at batch 64, {t['ort_b1_speedup']:.2f}x at batch 1.",
            "Ranks (r_out, r_in): " + ", ".join(f"{r['name']} {tuple(r['ranks'])}" for r in t["layers"] if r["replaced"]) + ".",
            "",
        ]
    if "separable" in results:
        s = results["separable"]
        lines += [
            "## Depthwise-separable substitution on vgg (per-channel SVD init, fine-tuned with KD)",
            "",
            *TABLE_HEAD,
            *lowrank_rows("vgg separable", s, "separable"),
            "",
            f"Conv+BN folding, max |diff| of the logits on 256 test images: vgg {s['fold_max_abs_diff']['vgg']:.2e}, "
            f"separable vgg {s['fold_max_abs_diff']['vgg_separable']:.2e}.",
            "",
        ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_lowrank.md").write_text("\n".join(lines))
    payload = {"environment": env, "threads": args.threads, **results}
    (RESULTS / "distill_lowrank.json").write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", *PARTS], default="all")
    parser.add_argument("--redo", choices=PARTS, action="append", default=[], help="forget a part's stored results first")
    parser.add_argument("--remeasure", choices=PARTS, action="append", default=[], help="re-measure a part, reusing its trained weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--state", default="runs/benchmark-distill-lowrank/state.json")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kd-epochs", type=int, default=5)
    parser.add_argument("--kd-lr", type=float, default=0.05)
    parser.add_argument("--kd-subset", type=int, default=10000, help="train both arms on the first N training images (0: all)")
    parser.add_argument("--kd-temperature", type=float, default=4.0)
    parser.add_argument("--kd-alpha", type=float, default=0.9)
    parser.add_argument("--svd-compression", type=float, default=3.0)
    parser.add_argument("--svd-epochs", type=int, default=4)
    # KD's T²-scaled soft loss steps ~T·alpha times harder than CE: BN-free lenet300 diverges at CE's lr 0.02
    parser.add_argument("--svd-lr", type=float, default=0.01)
    parser.add_argument("--svd-vgg-epochs", type=int, default=1)
    parser.add_argument("--tucker-compression", type=float, default=2.5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--tucker-epochs", type=int, default=2)
    parser.add_argument("--separable-epochs", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    state = State(Path(args.state))
    for part in args.redo:
        state.forget(part)
    for part in args.remeasure:
        state.forget(part, keep_training=True)
    data = load_data()
    env = environment()
    parts = PARTS if args.part == "all" else (args.part,)
    runners = {"kd": part_kd, "svd": part_svd, "tucker": part_tucker, "separable": part_separable}
    results = {}
    for part in PARTS:
        if part in parts:
            start = time.perf_counter()
            log.info("part %s", part)
            results[part] = runners[part](state, args, data)
            log.info("part %s done in %.0fs", part, time.perf_counter() - start)
        elif state.get(f"{part}/done") is not None:
            results[part] = state.get(f"{part}/done")
        if part in results:
            state.put(f"{part}/done", results[part])
            write_report(results, env, args)  # after every part: partial results are readable while the rest runs
    log.info("wrote %s and %s", RESULTS / "distill_lowrank.md", RESULTS / "distill_lowrank.json")


if __name__ == "__main__":
    main()
