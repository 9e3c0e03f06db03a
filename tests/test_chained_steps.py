"""Chained steps stay correct: a second pruning step (magnitude, or N:M after magnitude or
channel pruning) keeps the first one's zeros, fine-tuning never revives a pruned weight, and
a HashedNets model packs to its buckets (round trip exact, ONNX export works)."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deepshrink.compress.prune import satisfies_nm
from deepshrink.compress.share import HashShare
from deepshrink.compress.share.hashing import HashShareMethod
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle, ImageSet
from deepshrink.encode.container import DszError
from deepshrink.encode.hashed import buckets_of
from deepshrink.encode.pack import pack, pack_verified, unpack
from deepshrink.export import onnx_bytes, ort_session, verify_onnx
from deepshrink.pipeline.recipe import parse_recipe
from deepshrink.pipeline.runner import run_recipe
from tests.conftest import make_learnable_set

pytestmark = pytest.mark.unit
ONE_EPOCH = {"epochs": 1, "lr": 0.05, "batch_size": 32, "schedule": "constant"}
LAYERS = ("0", "2", "6", "8")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(784, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    data = make_learnable_set(320, seed=5)
    part = lambda a, b: ImageSet(data.images[a:b], data.labels[a:b])  # noqa: E731
    return DataBundle("synthetic", part(0, 256), part(256, 288), part(288, 320), 4, (0.0,), (1.0,))


def run(steps: list[dict], bundle: DataBundle, out):
    result = run_recipe(net(), parse_recipe({"name": "t", "version": 1, "steps": steps}), bundle, out, progress=False)
    checkpoints = [load_file(out / f"step{i}_{next(iter(step))}.safetensors") for i, step in enumerate(steps, 1)]
    return result, checkpoints


def zeros(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: state[f"{name}.weight"] == 0 for name in LAYERS if f"{name}.weight" in state}


def assert_still_zero(earlier: dict[str, torch.Tensor], later: dict[str, torch.Tensor]) -> None:
    pruned = zeros(earlier)
    assert sum(int(z.sum()) for z in pruned.values()) > 0
    for name, was_zero in pruned.items():
        assert bool((later[f"{name}.weight"][was_zero] == 0).all()), f"layer {name}: a pruned weight came back"


def test_second_magnitude_step_and_finetune_keep_the_first_steps_zeros(bundle, tmp_path):
    """The second step asks for less (0.3, Linear layers only) and fine-tunes: the conv zeros it does
    not own and the Linear zeros beyond its target all stay zero, through a finetune step too."""
    steps = [
        {"prune": {"sparsity": 0.6}},
        {"prune": {"sparsity": 0.3, "scope": {"types": ["Linear"]}, "finetune": ONE_EPOCH}},
        {"finetune": {"train": ONE_EPOCH}},
    ]
    result, (first, second, third) = run(steps, bundle, tmp_path / "r")
    assert_still_zero(first, second)
    assert_still_zero(first, third)
    assert_still_zero(first, result.model.state_dict())
    assert not torch.equal(first["6.weight"], third["6.weight"])  # it did train
    assert result.rows[2].nonzero_params == result.rows[1].nonzero_params == result.rows[3].nonzero_params


def test_nm_after_magnitude_keeps_the_zeros_and_the_pattern(bundle, tmp_path):
    steps = [{"prune": {"sparsity": 0.7}}, {"nm_prune": {"n": 2, "m": 4, "scope": {"include": "^(2|6|8)$"}, "finetune": ONE_EPOCH}}]
    result, (first, second) = run(steps, bundle, tmp_path / "r")
    assert_still_zero(first, second)
    assert all(satisfies_nm(second[f"{name}.weight"], 2, 4) for name in ("2", "6", "8"))
    assert float((second["6.weight"] == 0).float().mean()) >= 0.7  # 2:4 over 70% zeros: never fewer zeros


def test_nm_after_channel_pruning_and_finetune_keep_the_pattern(bundle, tmp_path):
    steps = [
        {"channel_prune": {"ratio": 0.5}},
        {"nm_prune": {"n": 2, "m": 4, "scope": {"include": "^(2|6|8)$"}, "finetune": ONE_EPOCH}},
        {"finetune": {"train": ONE_EPOCH}},
    ]
    result, (first, second, third) = run(steps, bundle, tmp_path / "r")
    assert second["2.weight"].shape == first["2.weight"].shape == (8, 4, 3, 3)  # channels gone, structure kept
    assert_still_zero(second, third)
    assert all(satisfies_nm(third[f"{name}.weight"], 2, 4) for name in ("2", "6", "8"))


# -- HashedNets: buckets + seed + hash spec in the .dsz -------------------------------------
def hashed_mlp(bundle: DataBundle | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 4))
    finetune = {"finetune": {"epochs": 1, "lr": 0.01, "batch_size": 32}} if bundle is not None else {}
    cfg = HashShare.from_dict({"bucket_fraction": 0.125, **finetune})
    return apply_method(model, cfg, Context(bundle, progress=False))


def test_hashed_model_packs_to_its_buckets_and_round_trips_exactly(bundle, tmp_path):
    model = hashed_mlp(bundle)
    buckets = model.hash_specs["1.weight"]["buckets"] + model.hash_specs["3.weight"]["buckets"]
    assert buckets == round(0.125 * 784 * 128) + 64
    report, decoded = pack_verified(model, tmp_path / "m.dsz")
    codecs = {t.name: t.codec for t in report.tensors}
    assert codecs["1.weight"] == codecs["3.weight"] == "hashed"
    payload = 4 * (buckets + 128 + 4)  # float32 buckets and biases
    raw = 4 * sum(p.numel() for p in model.parameters())
    assert payload <= report.file_bytes < payload + 2048 and report.file_bytes < raw / 7  # 8x fewer values, small manifest
    again = unpack(tmp_path / "m.dsz", copy.deepcopy(model))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    x = bundle.test.images[:16]
    assert verify_onnx(decoded, ort_session(onnx_bytes(decoded, (1, 28, 28)), threads=1), x) < 1e-5


def test_a_changed_hashed_weight_falls_back_and_a_foreign_hash_is_refused(tmp_path):
    model = hashed_mlp()
    with torch.no_grad():
        model[1].weight[0, 0] += 1.0  # no longer what the buckets give: stored another way, still exactly
    report, _ = pack_verified(model, tmp_path / "m.dsz")
    assert {t.name: t.codec for t in report.tensors}["1.weight"] != "hashed"
    assert buckets_of(model[3].weight.detach().numpy().reshape(-1), 64, model.hash_specs["3.weight"]["seed"] + 1) is None
    specs = {k: {**v, "hash": "other/1"} for k, v in model.hash_specs.items()}
    plain = copy.deepcopy(model)
    plain.hash_specs = specs
    assert all(t.codec != "hashed" for t in pack(plain, tmp_path / "p.dsz").tensors)  # an unknown hash is not claimed


def test_hash_specs_survive_a_resume(tmp_path):
    model = hashed_mlp()
    method = HashShareMethod()
    restored = method.restore(
        nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 4)), None, None, method.saved(model)
    )
    assert restored.hash_specs == model.hash_specs


def test_decoder_refuses_a_bucket_count_that_does_not_match(tmp_path):
    from deepshrink.encode.container import read_archive, write_archive

    model = hashed_mlp()
    pack(model, tmp_path / "m.dsz")
    manifest, streams = read_archive(tmp_path / "m.dsz")
    next(e for e in manifest["tensors"] if e["name"] == "3.weight")["buckets"] = 65
    write_archive(tmp_path / "bad.dsz", manifest, streams)
    with pytest.raises(DszError, match="3.weight"):
        unpack(tmp_path / "bad.dsz", copy.deepcopy(model))
