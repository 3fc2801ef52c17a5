import io
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import inspect_dataset, load_dataset
from core.errors import DatasetError
from core.models import Preprocess

GRAY28 = Preprocess(mean=(0.286,), std=(0.353,), input_size=(1, 28, 28))
RGB32 = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 32, 32), interpolation="bilinear")


def _png(color: int, size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, color, color)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fashion_mnist_splits_and_limits():
    ds = load_dataset("fashion-mnist:train:10", GRAY28)
    assert len(ds) == 10 and ds.has_labels and ds.num_classes == 10
    x = ds.images()
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    raw = ds.array[:10].astype(np.float32) / 255
    assert torch.allclose(x[:, 0], torch.from_numpy((raw - 0.286) / 0.353), atol=1e-6)
    assert len(load_dataset("fashion-mnist:test", GRAY28)) == 10000


def test_a_fashion_mnist_limit_reads_the_same_first_records_as_the_whole_split():
    whole = load_dataset("fashion-mnist:test", GRAY28)
    head = load_dataset("fashion-mnist:test:37", GRAY28)
    assert np.array_equal(head.array, whole.array[:37]) and np.array_equal(head.labels, whole.labels[:37])
    # same file, so the same digest; the count tells the two sets apart
    assert head.fingerprint.split(":")[0] == whole.fingerprint.split(":")[0]
    assert head.fingerprint.endswith(":37") and whole.fingerprint.endswith(":10000")
    assert len(load_dataset("fashion-mnist:test:20000", GRAY28)) == 10000  # a limit past the end is the split


def test_a_truncated_idx_file_is_a_clear_dataset_error(tmp_path, monkeypatch):
    import gzip
    import shutil

    from core.data import FASHION_MNIST_DIR

    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(f"{FASHION_MNIST_DIR}/{name}", tmp_path / name)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        cut = f.read(16 + 784 * 5)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(cut)  # header says 10,000 images, 5 are there
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert len(load_dataset("fashion-mnist:test:5", GRAY28)) == 5
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("fashion-mnist:test:6", GRAY28)


@pytest.mark.parametrize(
    "bad", ["fashion-mnist", "fashion-mnist:val", "fashion-mnist:train:0", "fashion-mnist:train:x"]
)
def test_malformed_fashion_mnist_names_are_refused(bad):
    with pytest.raises(DatasetError):
        load_dataset(bad, GRAY28)


def test_npz_uint8_is_resized_and_channel_adapted(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((4, 16, 16), 255, np.uint8), y=np.array([0, 1, 2, 1]))
    ds = load_dataset(str(path), RGB32)
    x = ds.images()
    assert x.shape == (4, 3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0), atol=1e-4)
    assert inspect_dataset(path) == {"n": 4, "image_shape": [1, 16, 16], "has_labels": True, "num_classes": 3,
                                     "format": "npz-uint8", "normalized": False}


def test_npz_float_must_match_the_model_input(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((2, 1, 28, 28), np.float32))
    assert load_dataset(str(path), GRAY28).images().shape == (2, 1, 28, 28)
    with pytest.raises(DatasetError, match="expects"):
        load_dataset(str(path), RGB32)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"y": np.zeros(3)}, "array 'x'"),
    ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.zeros(2, np.int64)}, "2 labels for 3 images"),
    ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.array([0, -1, 1])}, "non-negative"),
    ({"x": np.zeros((3, 8), np.uint8)}, "N×H×W"),
    ({"x": np.full((1, 1, 28, 28), np.nan, np.float32)}, "NaN"),
    ({"x": np.array(["a", "b"])}, "uint8 or float"),
])
def test_malformed_npz_is_refused_with_the_reason(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path), GRAY28)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "pickle.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError):
        load_dataset(str(path), GRAY28)


def test_imagefolder_archives_load_with_labels_from_folders(tmp_path):
    tar_path = tmp_path / "set.tar.gz"
    _write_tar(tar_path, [("set/cat/a.png", _png(0)), ("set/cat/b.png", _png(10)), ("set/dog/c.png", _png(255))])
    ds = load_dataset(str(tar_path), RGB32)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"] and list(ds.labels) == [0, 0, 1]
    assert ds.images().shape == (3, 3, 32, 32)
    zip_path = tmp_path / "set.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("a/x.png", _png(5))
        zf.writestr("b/y.png", _png(6))
    assert inspect_dataset(zip_path)["num_classes"] == 2


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_archive_members_that_escape_are_refused(tmp_path, name):
    path = tmp_path / "evil.tar.gz"
    _write_tar(path, [(name, _png(1))])
    with pytest.raises(DatasetError, match="escapes"):
        load_dataset(str(path), RGB32)


def test_archive_links_and_devices_are_refused(tmp_path):
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE):
        path = tmp_path / f"link{kind!r}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("cls/x.png")
            info.type = kind
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        with pytest.raises(DatasetError, match="link|device"):
            load_dataset(str(path), RGB32)


def test_truncated_archive_and_undecodable_images_are_refused(tmp_path):
    good = tmp_path / "good.tar.gz"
    _write_tar(good, [("c/a.png", _png(1))])
    truncated = tmp_path / "trunc.tar.gz"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DatasetError):
        load_dataset(str(truncated), RGB32)
    broken = tmp_path / "broken.tar.gz"
    _write_tar(broken, [("c/a.png", b"not an image at all")])
    with pytest.raises(DatasetError, match="decode"):
        inspect_dataset(broken)


def test_zip_bomb_limits_apply(tmp_path):
    from core.archive import ArchiveLimits, safe_extract

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("c/big.png", b"\0" * (4 * 1024 * 1024))
    with pytest.raises(DatasetError, match="larger than"):
        safe_extract(path, tmp_path / "out", ArchiveLimits(max_member_bytes=1024 * 1024))
    assert not (tmp_path / "out").exists()
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(50):
            zf.writestr(f"c/{i}.png", b"x")
    with pytest.raises(DatasetError, match="more than 10 members"):
        safe_extract(many, tmp_path / "out2", ArchiveLimits(max_members=10))
