"""Model-level .dsz archives: bit-exact round trips for every zoo model, layouts, size and corruption."""

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.compress.prune import apply_masks, magnitude_masks
from deepshrink.compress.share import KMeansShare
from deepshrink.core.errors import DeepShrinkError, InputError
from deepshrink.core.methods import apply_method
from deepshrink.encode.container import DszError
from deepshrink.encode.pack import pack, unpack, unpack_state
from deepshrink.models import create_model, list_models

pytestmark = pytest.mark.unit


def batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def zoo_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name)
    model.train()
    with torch.no_grad():
        model(batch(seed=1, n=8))  # non-trivial BN running stats and num_batches_tracked
    return model.eval()


def prune(model: nn.Module, sparsity: float) -> nn.Module:
    apply_masks(model, magnitude_masks(model, sparsity))
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, tensor in sa.items():
        other = sb[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(tensor, other), name
        if tensor.is_floating_point():  # bit-exact, signs of zeros included
            assert torch.equal(tensor.view(torch.int32), other.view(torch.int32)), name


def assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = batch(seed=2)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def codecs(report) -> dict[str, str]:
    return {t.name: t.codec for t in report.tensors}


@pytest.mark.parametrize("name", list_models())
def test_pruned_and_shared_zoo_model_round_trips(name, tmp_path):
    model = apply_method(prune(zoo_model(name), 0.8), KMeansShare())
    path = tmp_path / "x.dsz"
    report = pack(model, path, {"zoo": name})
    assert report.path == path and report.file_bytes == path.stat().st_size
    assert report.numel == sum(t.numel() for t in model.state_dict().values())
    restored = unpack(path)
    assert type(restored) is type(model) and not restored.training
    assert_same_state(model, restored)
    assert_same_outputs(model, restored)
    # Shared weights actually went through the codebook layouts.
    weight_codecs = {c for n, c in codecs(report).items() if n.endswith("weight") and model.state_dict()[n].dim() > 1}
    assert weight_codecs and all(c.startswith("codebook/") for c in weight_codecs)
    if any("num_batches_tracked" in k for k in model.state_dict()):
        tracked = [v for k, v in restored.state_dict().items() if k.endswith("num_batches_tracked")]
        assert all(v.dtype == torch.int64 and int(v) == 1 for v in tracked)


def test_dense_model_round_trips_raw(tmp_path):
    model = zoo_model("lenet5")
    report = pack(model, tmp_path / "dense.dsz", {"zoo": "lenet5"})
    assert set(codecs(report).values()) == {"raw"}
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values())
    assert fp32 <= report.file_bytes < fp32 + 4096  # raw payload plus a small manifest
    restored = unpack(report.path)
    assert_same_state(model, restored)
    assert_same_outputs(model, restored)


def test_pruned_unshared_model_uses_sparse_layout(tmp_path):
    model = prune(zoo_model("lenet300"), 0.8)
    report = pack(model, tmp_path / "pruned.dsz", {"zoo": "lenet300"})
    c = codecs(report)
    for name in ("1.weight", "3.weight"):
        assert c[name] == "sparse/sparse_raw", name
    assert c["5.weight"] == "codebook/dense"  # 200 non-zeros: at most 256 distinct values, a codebook is exact
    restored = unpack(report.path)
    assert_same_state(model, restored)
    assert_same_outputs(model, restored)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert report.file_bytes < 0.25 * fp32  # 20% fp32 values + short relative indices
    # The index width is chosen for the total size: fillers cost a 4-byte value each, so few are wanted.
    for t in report.tensors:
        if t.codec == "sparse/sparse_raw":
            nonzero = int(torch.count_nonzero(model.state_dict()[t.name]))
            assert t.bytes < 4.75 * nonzero, t.name


def test_pruned_shared_lenet300_is_much_smaller(tmp_path):
    model = apply_method(prune(zoo_model("lenet300"), 0.9), KMeansShare(linear_bits=5))
    report = pack(model, tmp_path / "small.dsz", {"zoo": "lenet300"})
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert fp32 / report.file_bytes > 20
    assert fp32 / report.fixed_width_bytes > 8  # entropy coding beats the fixed-width layout too...
    assert report.file_bytes < report.fixed_width_bytes  # ...and the file is smaller still
    assert_same_state(model, unpack(report.path))


def test_tensor_stats_respect_entropy_bound(tmp_path):
    model = apply_method(prune(zoo_model("lenet5"), 0.8), KMeansShare(conv_bits=4, linear_bits=4))
    state = model.state_dict()
    pruned_only = prune(zoo_model("lenet300"), 0.7)
    for m in (model, pruned_only):
        report = pack(m, tmp_path / "s.dsz")
        coded = [t for t in report.tensors if t.codec != "raw"]
        assert coded
        for t in report.tensors:
            assert t.bytes > 0 and t.numel > 0
            assert t.entropy_bits <= 8 * t.bytes, t.name
            assert t.bits_per_weight == pytest.approx(8 * t.bytes / t.numel)
            if t.codec == "raw":
                assert t.bytes == t.numel * m.state_dict()[t.name].element_size()
    assert {t.name for t in pack(model, tmp_path / "t.dsz").tensors} == set(state)


def test_negative_zero_round_trips_bit_exactly(tmp_path):
    values = torch.tensor([0.25, -0.5, 0.0, 1.0]).repeat(32)  # few distinct values, >= 64 elements
    values[5] = -0.0
    values[9] = -0.0
    state = {"w": values, "lone": torch.tensor([-0.0, 0.0, -1.5])}
    pack(state, tmp_path / "neg.dsz")
    restored, manifest = unpack_state(tmp_path / "neg.dsz")
    for name, tensor in state.items():
        assert torch.equal(restored[name].view(torch.int32), tensor.view(torch.int32)), name
    assert torch.signbit(restored["w"][5]) and not torch.signbit(restored["w"][2])
    assert manifest["architecture"] is None


def test_negative_zero_in_model_weight(tmp_path):
    model = apply_method(prune(zoo_model("lenet300"), 0.8), KMeansShare(linear_bits=3))
    with torch.no_grad():
        model[1].weight[0, 0] = -0.0
    pack(model, tmp_path / "m.dsz", {"zoo": "lenet300"})
    restored = unpack(tmp_path / "m.dsz")
    assert torch.signbit(restored[1].weight[0, 0])
    assert_same_state(model, restored)


def test_other_dtypes_round_trip(tmp_path):
    state = {
        "f16": torch.randn(100).half(),
        "i64": torch.arange(-50, 50),
        "i32": torch.arange(70, dtype=torch.int32),
        "u8": torch.arange(200, dtype=torch.uint8),
        "i8": torch.arange(-100, 100, dtype=torch.int8),
        "b": torch.arange(80) % 3 == 0,
        "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    pack(state, tmp_path / "d.dsz")
    restored, _ = unpack_state(tmp_path / "d.dsz")
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(restored[name], tensor), name


def test_unsupported_dtype(tmp_path):
    with pytest.raises(DszError, match="float64"):
        pack({"x": torch.zeros(3, dtype=torch.float64)}, tmp_path / "bad.dsz")


# -- corrupt archives -----------------------------------------------------------------------------
@pytest.fixture
def archive(tmp_path):
    model = apply_method(prune(zoo_model("lenet5"), 0.8), KMeansShare(conv_bits=4, linear_bits=4))
    path = tmp_path / "good.dsz"
    pack(model, path, {"zoo": "lenet5"})
    return path


def expect_dsz_error(path, model=None) -> str:
    with pytest.raises(DszError) as info:
        unpack(path, model)
    assert isinstance(info.value, DeepShrinkError)
    message = str(info.value)
    assert message and "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("where", [0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_flipped_byte(archive, tmp_path, where):
    data = bytearray(archive.read_bytes())
    i = min(int(where * len(data)), len(data) - 1)
    data[i] ^= 0x5A
    bad = tmp_path / "flipped.dsz"
    bad.write_bytes(bytes(data))
    expect_dsz_error(bad)


def test_every_flipped_byte_of_a_small_archive_is_detected(tmp_path):
    path = tmp_path / "tiny.dsz"
    pack({"w": torch.tensor([0.5, 0.0, -0.25, 0.0]).repeat(20), "b": torch.randn(3)}, path)
    data = path.read_bytes()
    bad = tmp_path / "bad.dsz"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        bad.write_bytes(bytes(flipped))
        with pytest.raises(DszError):
            unpack_state(bad)


@pytest.mark.parametrize("keep", [0, 3, 10, 100, -1, -33])
def test_truncated(archive, tmp_path, keep):
    data = archive.read_bytes()
    bad = tmp_path / "truncated.dsz"
    bad.write_bytes(data[:keep])
    expect_dsz_error(bad)


def test_garbage(tmp_path):
    bad = tmp_path / "garbage.dsz"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not a .dsz" in expect_dsz_error(bad)
    bad.write_bytes(b"DSZ\x00" + bytes(200))
    expect_dsz_error(bad)


def test_missing_file(tmp_path):
    assert "not found" in expect_dsz_error(tmp_path / "nope.dsz")


def test_wrong_model(archive):
    message = expect_dsz_error(archive, create_model("lenet300"))
    assert "does not match" in message
    expect_dsz_error(archive, create_model("lenet5", num_classes=4))  # same keys, other shapes


def test_unpack_into_given_model(archive):
    target = create_model("lenet5")
    restored = unpack(archive, target)
    assert restored is target
    reference = unpack(archive)
    assert_same_state(reference, restored)


def test_no_architecture_and_no_model(tmp_path):
    model = zoo_model("lenet5")
    pack(model, tmp_path / "anon.dsz")
    with pytest.raises(InputError, match="architecture"):
        unpack(tmp_path / "anon.dsz")
    assert_same_state(model, unpack(tmp_path / "anon.dsz", create_model("lenet5")))


def test_architecture_kwargs(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet300", num_classes=4)
    pack(model, tmp_path / "k.dsz", {"zoo": "lenet300", "kwargs": {"num_classes": 4}})
    restored = unpack(tmp_path / "k.dsz")
    assert restored[-1].out_features == 4
    assert_same_state(model, restored)


def test_non_finite_values_round_trip_bit_exactly(tmp_path):
    shared = torch.tensor([0.5, -0.5, 0.0, 1.0]).repeat(32)
    shared[3], shared[7], shared[11] = float("nan"), float("inf"), -float("inf")
    dense = torch.randn(300, generator=torch.Generator().manual_seed(0))
    dense[::7] = 0.0
    dense[5] = float("nan")
    state = {"shared": shared, "dense": dense}
    pack(state, tmp_path / "nan.dsz")
    restored, _ = unpack_state(tmp_path / "nan.dsz")
    for name, tensor in state.items():
        assert torch.equal(restored[name].view(torch.int32), tensor.view(torch.int32)), name
