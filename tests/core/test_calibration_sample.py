import numpy as np
import pytest
from PIL import Image

from core.calibration_sample import calibration_sample, sample_indices
from core.checkpoint import read_checkpoint_metadata
from core.config import QuantConfig
from core.data import load_dataset
from core.models import Preprocess
from core.pipeline import run_quantization

GRAY28 = Preprocess(mean=(0.286,), std=(0.353,), input_size=(1, 28, 28))


def _class_sorted_labels(sizes):
    return np.concatenate([np.full(size, c) for c, size in enumerate(sizes)])


@pytest.mark.parametrize("n", [1, 7, 64, 100, 333])
def test_a_sample_of_class_sorted_labels_is_proportional_within_one_per_class(n):
    sizes = [130, 40, 300, 7, 523]
    labels = _class_sorted_labels(sizes)
    idx = sample_indices(labels, len(labels), n, seed=3)
    assert len(idx) == n and len(set(idx.tolist())) == n
    counts = np.bincount(labels[idx], minlength=len(sizes))
    expected = np.asarray(sizes) * n / len(labels)
    assert np.all(np.abs(counts - expected) < 1), (counts, expected)


def test_every_prefix_of_the_sample_stays_proportional():
    """The first 64 images initialise the activation quantizers: they must not be one class either."""
    labels = _class_sorted_labels([1300] * 10)
    idx = sample_indices(labels, len(labels), 1024, seed=0)
    for m in (16, 64, 256):
        counts = np.bincount(labels[idx[:m]], minlength=10)
        assert np.all(np.abs(counts - m / 10) <= 2), (m, counts)


def test_the_sample_depends_on_the_seed_and_only_on_it():
    labels = _class_sorted_labels([50, 50, 50])
    a, b = sample_indices(labels, 150, 30, seed=1), sample_indices(labels, 150, 30, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_indices(labels, 150, 30, seed=2))


def test_unlabelled_data_is_sampled_uniformly_without_replacement():
    idx = sample_indices(None, 1000, 100, seed=0)
    assert len(set(idx.tolist())) == 100 and idx.max() < 1000
    assert not np.array_equal(np.sort(idx), np.arange(100))  # not "the first 100"
    assert sorted(sample_indices(None, 10, 50, seed=0).tolist()) == list(range(10))  # asked more than there is


def test_calib_size_below_a_fashion_mnist_slice_samples_within_that_slice():
    ds = load_dataset("fashion-mnist:train:500", GRAY28)
    sample = calibration_sample(ds, 50, seed=0)
    assert sample.images.shape == (50, 1, 28, 28) and sample.indices.max() < 500
    assert sample.population == 500 and sum(sample.per_class_counts.values()) == 50
    assert set(sample.per_class_counts) <= set(ds.classes)


def _fmnist_class_sorted_folder(root, per_class):
    """Real Fashion-MNIST images written as a class-sorted ImageFolder (and the same images, shuffled)."""
    ds = load_dataset("fashion-mnist:train:3000", GRAY28)
    xs, ys = [], []
    for c in range(10):
        members = np.flatnonzero(ds.labels == c)[:per_class]
        (root / f"class_{c}").mkdir(parents=True)
        for j, i in enumerate(members):
            Image.fromarray(ds.array[i]).save(root / f"class_{c}" / f"{j:04d}.png")
            xs.append(ds.array[i])
            ys.append(c)
    order = np.random.default_rng(0).permutation(len(xs))
    return np.stack(xs)[order], np.asarray(ys, dtype=np.int64)[order]


def test_only_the_sampled_files_of_an_image_folder_are_decoded(tmp_path, monkeypatch):
    _fmnist_class_sorted_folder(tmp_path / "folder", per_class=12)
    ds = load_dataset(str(tmp_path / "folder"), GRAY28)
    opened = []
    real_open = Image.open
    monkeypatch.setattr("core.data.Image.open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    sample = calibration_sample(ds, 20, seed=0)
    assert len(opened) == 20 and sample.images.shape[0] == 20
    assert all(count == 2 for count in sample.per_class_counts.values())


@pytest.mark.slow
def test_a_class_sorted_image_folder_calibrates_like_the_same_images_shuffled(tmp_path):
    x, y = _fmnist_class_sorted_folder(tmp_path / "folder", per_class=30)
    np.savez(tmp_path / "shuffled.npz", x=x, y=y)
    config = QuantConfig(w_bits=4, a_bits=4, method="repq", calib_size=100, seed=0)
    tops = {}
    for name, source in (("folder", str(tmp_path / "folder")), ("npz", str(tmp_path / "shuffled.npz"))):
        out = tmp_path / f"out-{name}"
        report = run_quantization("fmnist-vit-tiny", config, source, "fashion-mnist:test:1000", out)
        calibration = report["calibration"]
        assert calibration["n"] == 100 and calibration["seed"] == 0 and calibration["population"] == 300
        assert calibration["stratified"] and sorted(calibration["per_class_counts"].values()) == [10] * 10
        header = read_checkpoint_metadata(out / "checkpoint.safetensors")
        assert header["calibration_sample"]["per_class_counts"] == calibration["per_class_counts"]
        assert header["calibration_sample"]["seed"] == 0 and header["calibration_sample"]["n"] == 100
        tops[name] = report["quant"]["top1"]
    # different images of the same classes: equal within noise (the first 100 files would be 4 classes)
    assert abs(tops["folder"] - tops["npz"]) <= 0.03, tops
