"""Deep Compression on the zoo, side by side with general-purpose compressors.

    .venv/bin/python benchmarks/deep_compression.py [--models lenet300,lenet5_caffe] [--threads 2]

For each model: the deepshrink/recipes/deep_compression.yaml run (per-stage table), the
.dsz bytes on disk against gzip / zstd / xz of the same weights (the fp32
safetensors and the pruned+shared safetensors), and for every zoo model a
bit-exact round trip (torch.equal weights, identical predictions on the whole
test set). Writes benchmarks/results/deep_compression.{md,json} and
pack_round_trip.{md,json}; `--part recipe` or `--part round-trip` runs one half.
"""

import argparse
import gzip
import json
import lzma
import tempfile
from pathlib import Path

import torch
import zstandard

from deepshrink.data import load_data
from deepshrink.encode.pack import pack, unpack
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.models import create_model, list_models
from deepshrink.models.weights import save_weights
from deepshrink.pipeline.recipe import load_recipe
from deepshrink.pipeline.runner import STAGE_COLUMNS, run_recipe
from deepshrink.report import Column, markdown_table, print_table

RESULTS = Path(__file__).parent / "results"
PEERS = {
    "gzip -9": lambda b: len(gzip.compress(b, 9)),
    "zstd -19": lambda b: len(zstandard.ZstdCompressor(level=19).compress(b)),
    "xz -9": lambda b: len(lzma.compress(b, preset=9)),
}


STREAM_COLUMNS = [
    Column("tensor", lambda t: t["name"]),
    Column("codec/layout", lambda t: t["codec"]),
    Column("weights", lambda t: t["numel"], "{:,}"),
    Column("bytes", lambda t: t["bytes"], "{:,}"),
    Column("bits/weight", lambda t: t["bits_per_weight"], "{:.3f}"),
    Column("entropy bound bits/weight", lambda t: t["entropy_bits"] / t["numel"], "{:.3f}"),
]


def safetensors_bytes(model: torch.nn.Module) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return save_weights(model, Path(tmp) / "w.safetensors").read_bytes()


def peer_sizes(label: str, model: torch.nn.Module) -> dict:
    raw = safetensors_bytes(model)
    return {"weights": label, "safetensors": len(raw), **{name: size(raw) for name, size in PEERS.items()}}


@torch.no_grad()
def round_trip(name: str, data, tmp: Path) -> dict:
    """Pack/unpack the pretrained (dense, raw-coded) model and a pruned+shared copy; both must be exact."""
    from deepshrink.compress.prune import apply_masks, magnitude_masks
    from deepshrink.compress.share import KMeansShare
    from deepshrink.core.methods import apply_method

    model = create_model(name, pretrained=True)
    compressed = create_model(name, pretrained=True)
    apply_masks(compressed, magnitude_masks(compressed, 0.8))
    compressed = apply_method(compressed, KMeansShare())
    row = {"model": name}
    for label, m in (("pretrained", model), ("pruned+shared", compressed)):
        path = tmp / f"{name}-{label}.dsz"
        pack(m, path, {"zoo": name})
        restored = unpack(path)
        restored_state = restored.state_dict()
        equal = all(torch.equal(t, restored_state[k]) for k, t in m.state_dict().items())
        same_predictions = torch.equal(m(data.test.images).argmax(1), restored(data.test.images).argmax(1))
        row[label] = {"dsz_bytes": path.stat().st_size, "weights_equal": equal, "predictions_equal": same_predictions}
    return row


RT_COLUMNS = [
    Column("model", lambda r: r["model"]),
    Column("pretrained .dsz bytes", lambda r: r["pretrained"]["dsz_bytes"], "{:,}"),
    Column("exact", lambda r: r["pretrained"]["weights_equal"] and r["pretrained"]["predictions_equal"]),
    Column("pruned 80% + shared .dsz bytes", lambda r: r["pruned+shared"]["dsz_bytes"], "{:,}"),
    Column("exact", lambda r: r["pruned+shared"]["weights_equal"] and r["pruned+shared"]["predictions_equal"]),
]


def round_trips(data) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return [round_trip(name, data, Path(tmp)) for name in list_models()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,lenet5_caffe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/benchmark-deep-compression")
    parser.add_argument("--part", choices=["all", "recipe", "round-trip"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data()
    recipe = load_recipe("deep-compression")
    env = environment()
    sections, payload = [], {"environment": env, "threads": args.threads, "recipe": recipe.source, "models": {}}
    header = describe_environment(env, args.threads) + "Reproduce: `.venv/bin/python benchmarks/deep_compression.py`\n\n"
    RESULTS.mkdir(exist_ok=True)
    if args.part in ("all", "recipe"):
        for name in args.models.split(","):
            model = create_model(name, pretrained=True)
            result = run_recipe(model, recipe, data, Path(args.out) / name, {"zoo": name}, progress=False)
            final = unpack(result.dsz_path, create_model(name))
            peers = [peer_sizes("pretrained fp32", model), peer_sizes("after prune + share (fp32 tensors)", final)]
            peers.append({"weights": "after prune + share", "safetensors": None, "deepshrink .dsz": result.dsz_path.stat().st_size})
            print_table(result.rows, STAGE_COLUMNS, title=f"Deep Compression: {name}")
            streams = json.loads((result.out_dir / "dsz_streams.json").read_text())["tensors"]
            first, last = result.rows[0], result.rows[-1]
            payload["models"][name] = {
                "stages": [{**vars(r), "bytes": r.bytes, "ratio": r.ratio} for r in result.rows],
                "top1_drop_pp": first.top1 - last.top1,
                "compression_ratio": last.ratio,
                "peers": peers,
                "streams": streams,
            }
            peer_columns = [Column("weights", lambda r: r["weights"])] + [
                Column(k, lambda r, k=k: r.get(k), "{:,}") for k in ("safetensors", *PEERS, "deepshrink .dsz")
            ]
            sections.append(
                f"## {name}\n\nTop-1 {first.top1:.2f}% → {last.top1:.2f}% (drop {first.top1 - last.top1:.2f}pp), "
                f"{last.ratio:.1f}x smaller on disk ({first.fp32_bytes:,} → {last.bytes:,.0f} bytes).\n\n"
                + markdown_table(result.rows, STAGE_COLUMNS)
                + "\nThe same weights through general-purpose compressors (bytes):\n\n"
                + markdown_table(peers, peer_columns)
                + "\nPer tensor in the .dsz (coded bits per weight vs the Shannon bound of its symbol streams):\n\n"
                + markdown_table(streams, STREAM_COLUMNS)
            )
        (RESULTS / "deep_compression.md").write_text(
            "# Deep Compression on Fashion-MNIST\n\nRecipe: `deepshrink/recipes/deep_compression.yaml`.\n" + header + "\n".join(sections)
        )
        (RESULTS / "deep_compression.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.part in ("all", "round-trip"):
        rows = round_trips(data)
        print_table(rows, RT_COLUMNS, title="pack/unpack round trip")
        (RESULTS / "pack_round_trip.md").write_text(
            "# .dsz round trip, every zoo model\n\n"
            + header
            + "`unpack(pack(m))`: `exact` means torch.equal on every tensor and identical "
            "predictions on all 10,000 test images.\n\n" + markdown_table(rows, RT_COLUMNS)
        )
        (RESULTS / "pack_round_trip.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
