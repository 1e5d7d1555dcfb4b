import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from splitrpc import data
from splitrpc.config import parse_args
from splitrpc.errors import UserError


def cfg_for(tmp_path, *args):
    return parse_args(["--cache-dir", str(tmp_path / "cache"), *map(str, args)])


def labels_of(n=5000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_reproducible_disjoint_and_complete(scheme):
    labels = labels_of()
    a = data.partition(labels, 4, scheme, 0.5, seed=7)
    b = data.partition(labels, 4, scheme, 0.5, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    everything = np.concatenate(a)
    assert len(everything) == len(np.unique(everything)) == len(labels)
    c = data.partition(labels, 4, scheme, 0.5, seed=8)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_shards_are_balanced():
    parts = data.partition(labels_of(), 3, "iid", 0.5, seed=0)
    assert sorted(len(p) for p in parts) == [1666, 1667, 1667]


def _mean_total_variation(labels, parts, classes=10):
    overall = np.bincount(labels, minlength=classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_is_skewed_and_iid_is_not():
    labels = labels_of(20000)
    iid = _mean_total_variation(labels, data.partition(labels, 8, "iid", 0.5, 0))
    skew_strong = _mean_total_variation(labels, data.partition(labels, 8, "dirichlet", 0.1, 0))
    skew_mild = _mean_total_variation(labels, data.partition(labels, 8, "dirichlet", 10.0, 0))
    assert iid < 0.05
    assert skew_strong > 0.5  # most of a hospital's labels come from a few classes
    assert iid < skew_mild < skew_strong


def test_dirichlet_impossible_request_is_a_clear_error():
    with pytest.raises(UserError, match="raise --alpha"):
        data.partition(labels_of(60), 6, "dirichlet", 0.001, 0)


def test_epoch_plan():
    assert data.epoch_plan([2, 1], "sequential") == [[(1, 0)], [(2, 0)], [(1, 1)]]
    assert data.epoch_plan([2, 1], "parallel") == [[(1, 0), (2, 0)], [(1, 1)]]


def test_batches_are_deterministic_and_augmented(tmp_path):
    cfg = cfg_for(tmp_path, "--dataset", "synthetic", "--hospitals", 2, "--batch-size", 16)
    shard = data.load_shard(cfg, 1)
    x1, y1 = shard.batch(epoch=0, index=3)
    x2, y2 = shard.batch(epoch=0, index=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = shard.batch(epoch=1, index=3)
    assert not torch.equal(x1, x3)
    assert x1.shape == (16, 3, 32, 32) and x1.dtype == torch.float32
    plain = data.load_shard(cfg.replace(augment=False), 1)
    xp, yp = plain.batch(epoch=0, index=3)
    assert torch.equal(yp, y1) and not torch.equal(xp, x1)  # same samples, different pixels


def test_augment_is_crop_and_flip():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).view(2, 3, 32, 32) % 251
    g = torch.Generator().manual_seed(0)
    out = data.augment(images.to(torch.uint8), g)
    assert out.shape == images.shape
    for i in range(2):
        padded = torch.nn.functional.pad(images[i].to(torch.uint8), (4, 4, 4, 4))
        found = any(torch.equal(out[i], window) or torch.equal(out[i], window.flip(2))
                    for dy in range(9) for dx in range(9) for window in [padded[:, dy:dy + 32, dx:dx + 32]])
        assert found


def test_each_hospital_sees_only_its_shard(tmp_path):
    cfg = cfg_for(tmp_path, "--dataset", "synthetic", "--hospitals", 3, "--synthetic-train", 300, "--batch-size", 10)
    shards = [data.load_shard(cfg, h) for h in (1, 2, 3)]
    assert [len(s) for s in shards] == [100, 100, 100]
    rows = [set(map(bytes, s.images.numpy().reshape(len(s), -1))) for s in shards]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2])


def test_limit_train_takes_a_fixed_subset(tmp_path):
    cfg = cfg_for(tmp_path, "--dataset", "synthetic", "--limit-train", 100, "--hospitals", 1, "--batch-size", 10)
    a = data.load_shard(cfg, 1)
    b = data.load_shard(cfg.replace(seed=5), 1)
    assert len(a) == 100 and torch.equal(a.labels, b.labels)
    with pytest.raises(UserError, match="exceeds"):
        data.load_shard(cfg.replace(limit_train=10**6), 1)


def test_shard_smaller_than_batch_is_a_clear_error(tmp_path):
    cfg = cfg_for(tmp_path, "--dataset", "synthetic", "--synthetic-train", 100, "--hospitals", 2, "--batch-size", 64)
    with pytest.raises(UserError, match="fewer than --batch-size"):
        data.load_shard(cfg, 1)


def _write_jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _make_tree(root, per_class=3):
    for split in ("train", "test"):
        for c, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i}.jpg").write_bytes(_write_jpeg(color))


def test_imagefolder_directory_and_tarball_agree(tmp_path):
    tree = tmp_path / "tree"
    _make_tree(tree)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="top")  # an extra top-level folder is accepted
    arrays = []
    for source in (tree, archive):
        cfg = cfg_for(tmp_path, "--dataset", "imagefolder", "--data-dir", source)
        split = data.load_split(cfg, "train")
        arrays.append((split.images.take(np.arange(len(split.labels))), split.labels))
    (ia, la), (ib, lb) = arrays
    assert np.array_equal(la, [0, 0, 0, 1, 1, 1]) and np.array_equal(la, lb) and np.array_equal(ia, ib)
    assert ia[0, 0, 0, 0] > 150 and ia[3, 0, 0, 2] > 150  # cat is red, dog is blue: label 0 = first class name


def test_cache_is_reused_and_keyed_by_source(tmp_path):
    tree = tmp_path / "tree"
    _make_tree(tree)
    cfg = cfg_for(tmp_path, "--dataset", "imagefolder", "--data-dir", tree)
    data.prepare(cfg)
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 6  # images, labels and names of train and test
    stamp = [f.stat().st_mtime_ns for f in files]
    data.prepare(cfg)
    assert [f.stat().st_mtime_ns for f in files] == stamp
    (tree / "train" / "cat" / "extra.jpg").write_bytes(_write_jpeg((0, 255, 0)))
    data.prepare(cfg)
    assert len(sorted((tmp_path / "cache").glob("*.npy"))) == 12


def test_directory_that_is_neither_format(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    cfg = cfg_for(tmp_path, "--dataset", "imagefolder", "--data-dir", tmp_path / "junk")
    with pytest.raises(UserError, match="not an ImageFolder tree"):
        data.prepare(cfg)
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match="neither a directory"):
        data.prepare(cfg.replace(data_dir=str(tmp_path / "file.zip")))
    with pytest.raises(UserError, match="no such file"):
        data.prepare(cfg.replace(data_dir=str(tmp_path / "missing")))


def test_cifar_missing_offline_is_a_clear_error(tmp_path):
    cfg = cfg_for(tmp_path, "--dataset", "cifar10", "--data-dir", tmp_path / "empty")
    with pytest.raises(UserError, match="cifar10 not found.*--download"):
        data.prepare(cfg)


def test_real_archive_decodes_to_cifar10(cifar_jpeg, cache_dir):
    cfg = parse_args(["--dataset", "imagefolder", "--data-dir", cifar_jpeg, "--cache-dir", cache_dir])
    train, test = data.load_split(cfg, "train"), data.load_split(cfg, "test")
    assert len(train.labels) == 50000 and len(test.labels) == 10000
    assert np.array_equal(np.bincount(train.labels), [5000] * 10)
    assert train.images.array.shape == (50000, 32, 32, 3) and train.images.array.dtype == np.uint8
