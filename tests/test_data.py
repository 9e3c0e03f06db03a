"""Dataset readers, splits, augmentation, batching and calibration streams on tiny synthetic files."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deepshrink.core.errors import DatasetError, InputError
from deepshrink.data import CalibrationSet, ImageSet, augment_batch, iterate_batches, load_data
from deepshrink.data.idx import read_cifar_batches, read_idx, read_npz_split
from tests.conftest import CIFAR_RECORD, idx_bytes, indexed_images, write_cifar, write_idx, write_mnist

pytestmark = pytest.mark.unit

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def sample_ids(images: torch.Tensor) -> torch.Tensor:
    """Invert the MNIST normalisation and recover each image's fill value (its sample index)."""
    raw = (images * MNIST_STD + MNIST_MEAN) * 255
    ids = raw.round()
    assert torch.allclose(raw, ids, atol=1e-3)
    assert (ids == ids[:, :1, :1, :1]).all(), "each synthetic image is constant"
    return ids[:, 0, 0, 0].long()


# --- IDX / MNIST -------------------------------------------------------------


def test_mnist_shapes_normalisation_and_labels(mnist_dir):
    bundle = load_data("mnist", mnist_dir, val_size=10, seed=0)
    assert bundle.train.images.shape == (50, 1, 28, 28)
    assert bundle.val.images.shape == (10, 1, 28, 28)
    assert bundle.test.images.shape == (20, 1, 28, 28)
    assert bundle.train.images.dtype == torch.float32 and bundle.train.labels.dtype == torch.int64
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 28, 28)
    assert bundle.mean == (MNIST_MEAN,) and bundle.std == (MNIST_STD,)
    # Image 0 is all zeros: after normalisation it is exactly -mean/std.
    ids = sample_ids(bundle.train.images)
    if (ids == 0).any():
        zero = bundle.train.images[ids == 0][0]
        assert torch.allclose(zero, torch.full_like(zero, -MNIST_MEAN / MNIST_STD))
    # Every (image, label) pair survives the seeded split: image i carries label i % 10.
    for part in (bundle.train, bundle.val):
        assert torch.equal(part.labels, sample_ids(part.images) % 10)
    # Train and val are disjoint and together hold all 60 samples.
    all_ids = torch.cat([sample_ids(bundle.train.images), sample_ids(bundle.val.images)])
    assert sorted(all_ids.tolist()) == list(range(60))
    # Test set is untouched and in file order: image j has value 100 + j, label (j + 3) % 10.
    test_ids = sample_ids(bundle.test.images)
    assert torch.equal(test_ids, torch.arange(20) + 100)
    assert torch.equal(bundle.test.labels, (torch.arange(20) + 3) % 10)


def test_mnist_split_is_seeded(mnist_dir):
    a = load_data("mnist", mnist_dir, val_size=10, seed=1)
    b = load_data("mnist", mnist_dir, val_size=10, seed=1)
    c = load_data("mnist", mnist_dir, val_size=10, seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert set(sample_ids(a.val.images).tolist()) != set(sample_ids(c.val.images).tolist())
    # The split is shuffled, not the first/last val_size images.
    assert sample_ids(a.val.images).tolist() != list(range(10))
    assert sample_ids(a.val.images).tolist() != list(range(50, 60))


def test_mnist_subsets(mnist_dir):
    full = load_data("mnist", mnist_dir, val_size=10, seed=0)
    sub = load_data("mnist", mnist_dir, val_size=10, seed=0, train_subset=7, test_subset=5)
    assert len(sub.train) == 7 and len(sub.test) == 5 and len(sub.val) == 10
    assert torch.equal(sub.train.images, full.train.images[:7])
    assert torch.equal(sub.test.labels, full.test.labels[:5])
    larger = load_data("mnist", mnist_dir, val_size=10, seed=0, train_subset=1000)
    assert len(larger.train) == 50


def test_mnist_uncompressed_files(tmp_path):
    plain = write_mnist(tmp_path / "plain", compress=False)
    gz = write_mnist(tmp_path / "gz", compress=True)
    assert not list(plain.glob("*.gz"))
    a, b = load_data("mnist", plain, val_size=10, seed=3), load_data("mnist", gz, val_size=10, seed=3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)


def test_val_size_out_of_range(mnist_dir):
    with pytest.raises(InputError, match="val_size"):
        load_data("mnist", mnist_dir, val_size=60)


def test_read_idx_roundtrip(tmp_path):
    arr = indexed_images(3, size=5)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", arr)), arr)
    labels = np.arange(7, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b", labels, compress=False)), labels)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: b"\x08\x03\x00\x00" + bytes(100), "bad magic"),
        (lambda: b"\x00\x00\x42\x01" + bytes(100), "bad magic"),
        (lambda: b"", "bad magic"),
        (lambda: bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02", "header truncated"),
        (lambda: idx_bytes(indexed_images(2))[:-1], "corrupt IDX"),
        (lambda: idx_bytes(indexed_images(2)) + b"\x00", "corrupt IDX"),
        (lambda: gzip.compress(idx_bytes(indexed_images(2)))[:40], "corrupt gzip"),
    ],
    ids=["magic-prefix", "magic-dtype", "empty", "header", "data-short", "data-long", "gzip-truncated"],
)
def test_read_idx_rejects_corrupt_files(tmp_path, make, match):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(make())
    with pytest.raises(DatasetError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip_crc(tmp_path):
    data = bytearray(gzip.compress(idx_bytes(indexed_images(2))))
    data[-6] ^= 0xFF  # corrupt the CRC32 trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt gzip") as info:
        read_idx(path)
    assert "crc.gz" in str(info.value)


def test_missing_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="--data-dir") as info:
        load_data("mnist", tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_missing_file_names_it_and_says_how_to_get_it(mnist_dir):
    (mnist_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="--data-dir") as info:
        load_data("mnist", mnist_dir, val_size=10)
    assert "t10k-labels-idx1-ubyte" in str(info.value)


def test_corrupt_file_in_load_data_names_it(mnist_dir):
    path = mnist_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_data("mnist", mnist_dir, val_size=10)


def test_mismatched_image_and_label_counts(mnist_dir):
    write_idx(mnist_dir / "train-labels-idx1-ubyte.gz", np.zeros(59, np.uint8))
    with pytest.raises(DatasetError, match="do not match"):
        load_data("mnist", mnist_dir, val_size=10)


def test_unknown_dataset_and_missing_root():
    with pytest.raises(InputError, match="unknown dataset"):
        load_data("imagenet", Path("/"))
    with pytest.raises(InputError, match="needs a directory"):
        load_data("cifar10", None)


# --- CIFAR-10 binary --------------------------------------------------------


@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10_binary(tmp_path, subfolder):
    root = tmp_path / "cifar"
    written = write_cifar(root / "cifar-10-batches-bin" if subfolder else root, per_batch=2)
    bundle = load_data("cifar10", root, val_size=0)
    assert bundle.train.images.shape == (10, 3, 32, 32) and bundle.test.images.shape == (2, 3, 32, 32)
    assert bundle.val.images.shape == (0, 3, 32, 32)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    test_images, test_labels = written["test_batch.bin"]
    assert torch.equal(bundle.test.labels, torch.from_numpy(test_labels))
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    raw = (bundle.test.images * std + mean) * 255
    assert torch.allclose(raw, torch.from_numpy(test_images).float(), atol=1e-3)
    # Train labels are the ten batch labels, in some (seeded) order, each with its own image.
    expected = {
        tuple(img.reshape(-1)[:16].tolist()): int(lab)
        for name, (imgs, labs) in written.items()
        if name != "test_batch.bin"
        for img, lab in zip(imgs, labs, strict=True)
    }
    train_raw = ((bundle.train.images * std + mean) * 255).round().to(torch.uint8)
    got = {tuple(img.reshape(-1)[:16].tolist()): int(lab) for img, lab in zip(train_raw, bundle.train.labels, strict=True)}
    assert got == expected


def test_cifar10_missing_batch_says_how_to_get_it(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetError, match="data_batch_3.bin") as info:
        load_data("cifar10", tmp_path, val_size=0)
    assert "binary version" in str(info.value)


def test_cifar10_bad_size(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="not a multiple of 3073") as info:
        load_data("cifar10", tmp_path, val_size=0)
    assert "data_batch_2.bin" in str(info.value)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.bin"):
        read_cifar_batches([empty])


def test_cifar10_bad_label(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[CIFAR_RECORD] = 10  # label byte of the second record
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="label > 9") as info:
        load_data("cifar10", tmp_path, val_size=0)
    assert "test_batch.bin" in str(info.value)


# --- npz --------------------------------------------------------------------


def _npz_arrays(rng, layout: str):
    x = rng.integers(0, 256, size=(12, 3, 8, 8), dtype=np.uint8)
    xt = rng.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8)
    if layout == "NHW":
        x, xt = x[:, 0], xt[:, 0]
    elif layout == "NHWC":
        x, xt = x.transpose(0, 2, 3, 1), xt.transpose(0, 2, 3, 1)
    elif layout == "NCHW-float":
        x, xt = x.astype(np.float32) / 255, xt.astype(np.float32) / 255
    return {"x_train": x, "y_train": np.arange(12) % 5, "x_test": xt, "y_test": np.arange(4)}


@pytest.mark.parametrize("layout, channels", [("NHW", 1), ("NHWC", 3), ("NCHW-float", 3)])
def test_npz_layouts(tmp_path, layout, channels):
    arrays = _npz_arrays(np.random.default_rng(0), layout)
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    x, y = read_npz_split(path, "train")
    assert x.shape == (12, channels, 8, 8) and y.dtype == np.int64
    assert np.array_equal(y, np.arange(12) % 5)
    bundle = load_data("npz", path, val_size=2)
    assert bundle.train.images.shape == (10, channels, 8, 8)
    assert bundle.test.images.shape == (4, channels, 8, 8)
    assert bundle.num_classes == 5
    # npz has no fixed normalisation: statistics come from the training images.
    assert len(bundle.mean) == channels
    full = torch.cat([bundle.train.images, bundle.val.images])
    assert torch.allclose(full.mean((0, 2, 3)), torch.zeros(channels), atol=1e-5)


def test_npz_layouts_agree(tmp_path):
    """NHWC uint8 and NCHW float (same pixels / 255) load to the same normalised tensors."""
    nhwc, nchw = (_npz_arrays(np.random.default_rng(7), layout) for layout in ("NHWC", "NCHW-float"))
    np.savez(tmp_path / "a.npz", **nhwc)
    np.savez(tmp_path / "b.npz", **nchw)
    a = load_data("npz", tmp_path / "a.npz", val_size=0, seed=0)
    b = load_data("npz", tmp_path / "b.npz", val_size=0, seed=0)
    assert torch.allclose(a.train.images, b.train.images, atol=1e-5)
    assert torch.allclose(a.test.images, b.test.images, atol=1e-5)


def test_npz_missing_key(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0), "NHW")
    del arrays["y_test"]
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match="y_test") as info:
        load_data("npz", path, val_size=2)
    assert "set.npz" in str(info.value)


def test_npz_shape_mismatch(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0), "NHW")
    arrays["y_train"] = arrays["y_train"][:-1]
    np.savez(tmp_path / "set.npz", **arrays)
    with pytest.raises(DatasetError, match="y_train"):
        read_npz_split(tmp_path / "set.npz", "train")


UNPICKLED: list[str] = []


def _record_unpickle():
    UNPICKLED.append("ran")
    return "payload"


class Booby:
    def __reduce__(self):
        return (_record_unpickle, ())


def test_npz_object_array_is_never_unpickled(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0), "NHW")
    arrays["x_train"] = np.array([Booby()] * 12, dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    # Sanity: the file really does execute code when loaded with pickles allowed.
    with np.load(path, allow_pickle=True) as f:
        f["x_train"]
    assert UNPICKLED, "the fixture must really run code when unpickled"
    UNPICKLED.clear()
    with pytest.raises(DatasetError, match="evil.npz"):
        load_data("npz", path, val_size=2)
    assert UNPICKLED == []


@pytest.mark.parametrize("content", ["pickle", "npy", "garbage"])
def test_npz_not_an_archive(tmp_path, content):
    path = tmp_path / "data.npz"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"x_train": np.zeros(3)}))
    elif content == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros((2, 3, 3), np.uint8))
    else:
        path.write_bytes(b"definitely not a zip archive")
    with pytest.raises(DatasetError, match="data.npz"):
        read_npz_split(path, "train")


# --- augmentation and batching ----------------------------------------------


def test_augment_batch_shape_and_determinism():
    x = torch.randn(16, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    c = augment_batch(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_augment_pad0_only_flips():
    x = torch.randn(64, 2, 6, 6)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert any(same) and any(flipped), "both flipped and unflipped samples expected in 64 draws"


def test_augment_crops_are_windows_of_the_padded_image():
    pad, h, w = 2, 6, 7
    x = torch.rand(32, 1, h, w) + 1.0  # strictly positive so padding zeros are recognisable
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=pad)
    shifted = 0
    for o, i in zip(out, x, strict=True):
        candidates = []
        for img in (i, i.flip(-1)):
            padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
            candidates += [
                (dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) if torch.equal(o, padded[:, dy : dy + h, dx : dx + w])
            ]
        assert candidates, "output is not a crop of the zero-padded (possibly flipped) input"
        shifted += (pad, pad) not in candidates
    assert shifted > 0


def test_iterate_batches_shuffled_covers_each_sample_once():
    data = ImageSet(torch.arange(23, dtype=torch.float32).view(23, 1, 1, 1).expand(23, 1, 2, 2).clone(), torch.arange(23))
    batches = list(iterate_batches(data, 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(23))
    assert labels.tolist() != list(range(23))
    for x, y in batches:  # images stay paired with their labels
        assert torch.equal(x[:, 0, 0, 0].long(), y)
    again = torch.cat([y for _, y in iterate_batches(data, 5, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(labels, again)


def test_iterate_batches_in_order_without_shuffle():
    data = ImageSet(torch.zeros(7, 1, 2, 2), torch.arange(7))
    labels = [y.tolist() for _, y in iterate_batches(data, 3)]
    assert labels == [[0, 1, 2], [3, 4, 5], [6]]


def test_iterate_batches_needs_generator():
    data = ImageSet(torch.zeros(4, 1, 2, 2), torch.arange(4))
    with pytest.raises(ValueError, match="generator"):
        next(iterate_batches(data, 2, shuffle=True))
    with pytest.raises(ValueError, match="generator"):
        next(iterate_batches(data, 2, augment=True))


# --- calibration ------------------------------------------------------------


def test_calibration_accepts_tensors_tuples_and_dicts():
    xs = [torch.randn(4, 1, 3, 3) for _ in range(3)]
    for source, key in (
        (xs, 0),
        ([(x, torch.zeros(4)) for x in xs], 0),
        ([[torch.zeros(4), x] for x in xs], 1),
        ([{"image": x, "label": torch.zeros(4)} for x in xs], "image"),
    ):
        out = list(CalibrationSet(source, input_key=key))
        assert len(out) == 3 and all(torch.equal(o, x) for o, x in zip(out, xs, strict=True))


def test_calibration_dict_missing_key():
    with pytest.raises(InputError, match="'image'"):
        list(CalibrationSet([{"pixels": torch.randn(2, 3)}], input_key="image"))


def test_calibration_transform():
    xs = [torch.arange(4, dtype=torch.uint8).view(4, 1) for _ in range(2)]
    out = list(CalibrationSet(xs, transform=lambda t: t.float() / 2))
    assert all(o.dtype == torch.float32 for o in out)
    assert torch.equal(out[0], torch.tensor([[0.0], [0.5], [1.0], [1.5]]))


def test_calibration_max_samples_truncates_and_streams():
    pulled = []

    def source():
        for i in range(3):
            pulled.append(i)
            yield torch.full((4, 2), float(i))

    out = list(CalibrationSet(source(), max_samples=6))
    assert [len(o) for o in out] == [4, 2]
    assert torch.equal(out[1], torch.ones(2, 2))
    assert pulled == [0, 1], "must stop pulling once max_samples is reached"
    assert [len(o) for o in CalibrationSet([torch.zeros(4, 2)] * 3, max_samples=8)] == [4, 4]
    assert [len(o) for o in CalibrationSet([torch.zeros(4, 2)] * 3, max_samples=100)] == [4, 4, 4]
    # Iterable, not a one-shot iterator: a list source can be read twice.
    cal = CalibrationSet([torch.zeros(4, 2)] * 3, max_samples=5)
    assert [len(o) for o in cal] == [len(o) for o in cal] == [4, 1]


@pytest.mark.parametrize(
    "source, match",
    [
        ([], "empty"),
        ([np.zeros((2, 3), np.float32)], "tensor"),
        ([(1.0, 2.0)], "tensor"),
        ([torch.zeros(2, 3, dtype=torch.int64)], "floating"),
        ([torch.tensor(1.0)], "floating"),
    ],
    ids=["empty", "numpy", "float-tuple", "int-dtype", "scalar"],
)
def test_calibration_rejects_bad_sources(source, match):
    with pytest.raises(InputError, match=match):
        list(CalibrationSet(source))


@pytest.mark.parametrize("max_samples", [0, -3])
def test_calibration_max_samples_must_be_positive(max_samples):
    with pytest.raises(InputError, match="max_samples"):
        CalibrationSet([torch.zeros(1, 2)], max_samples=max_samples)
