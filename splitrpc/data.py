"""Data sets, partitions and batches. Runs on hospitals (and in the local trainer).

The server never imports a data set. A hospital decodes its source once into
uint8 arrays cached on disk (keyed by the source), memory-maps the cache and
copies only the rows of its own shard. Which samples form which batch, and how
each batch is augmented, is a pure function of (seed, hospital, epoch, batch),
so the local trainer reproduces the federation's batches exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitrpc.errors import UserError
from splitrpc.overlap import apply_overlap

IMAGE_SIZE = 32
CACHE_VERSION = 2  # 2: a names array (relative paths) beside images and labels
# Per-channel mean/std of the training sets (the ImageFolder default is CIFAR-10's).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
SYNTHETIC_DATA_SEED = 1234  # the synthetic data set is the same for every --seed
LIMIT_ORDER_SEED = 4321  # --limit-* take the first n of one fixed shuffle, the same for every --seed
DIRICHLET_MIN_SHARD = 10
DIRICHLET_MAX_DRAWS = 1000


@dataclass
class Arrays:
    """A split of a data set: uint8 images (N, H, W, 3), int64 labels and a name per sample.

    Freshly decoded, ``images`` is an array; from ``load_split`` it is a
    ``RowView`` of the memory-mapped cache, read only where indexed. Names are
    the relative paths of ImageFolder files (``train/<class>/<file>``, which a
    deduplication manifest refers to) and ``<split>/<index>`` otherwise.
    """

    images: "np.ndarray | RowView"
    labels: np.ndarray
    num_classes: int
    names: np.ndarray


def index_names(split: str, n: int) -> np.ndarray:
    return np.array([f"{split}/{i}" for i in range(n)])


# --------------------------------------------------------------------------- sources
def _source_key(cfg) -> tuple[str, str]:
    """(human-readable name, digest) identifying the decoded content of cfg's source."""
    if cfg.dataset == "synthetic":
        ident = f"synthetic|{cfg.synthetic_train}|{cfg.synthetic_test}|{cfg.num_classes}|{SYNTHETIC_DATA_SEED}"
        name = "synthetic"
    elif cfg.dataset in ("cifar10", "cifar100"):
        ident = f"{cfg.dataset}|{Path(cfg.data_dir).expanduser().resolve()}"
        name = cfg.dataset
    else:
        path = Path(cfg.data_dir).expanduser().resolve()
        if not path.exists():
            raise UserError(f"--data-dir {cfg.data_dir}: no such file or directory")
        if path.is_file():
            st = path.stat()
            ident = f"imagefolder-tar|{path}|{st.st_size}|{st.st_mtime_ns}"
        else:
            # A directory tree: its listing (names, sizes, mtimes) identifies it.
            h = hashlib.sha256()
            for split in ("train", "test"):
                for p in sorted((path / split).rglob("*")):
                    if p.is_file():
                        st = p.stat()
                        h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            ident = f"imagefolder-dir|{path}|{h.hexdigest()}"
        name = path.name.split(".")[0] or "imagefolder"
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{ident}".encode()).hexdigest()[:16]
    return name, digest


def _decode_image(raw: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for a bad file
        raise UserError(f"cannot decode image {where}: {exc}") from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _collect_imagefolder(entries) -> dict[str, Arrays]:
    """entries: iterable of (relative path parts, read-bytes callable) for every file."""
    per_split: dict[str, list[tuple[str, str, callable]]] = {"train": [], "test": []}
    for parts, read in entries:
        # Accept an optional top-level folder above train/ and test/.
        for i, part in enumerate(parts[:-2]):
            if part in per_split and len(parts) - i == 3:
                if parts[-1].lower().endswith(IMAGE_SUFFIXES):
                    per_split[part].append((parts[i + 1], parts[-1], read))
                break
    if not per_split["train"] or not per_split["test"]:
        missing = [s for s in ("train", "test") if not per_split[s]]
        raise UserError(f"--data-dir is not an ImageFolder tree: no images under {' or '.join(m + '/<class>/' for m in missing)}")
    classes = sorted({c for c, _, _ in per_split["train"]})
    unknown = sorted({c for c, _, _ in per_split["test"]} - set(classes))
    if unknown:
        raise UserError(f"--data-dir: test/ has classes that train/ lacks: {', '.join(unknown)}")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, items in per_split.items():
        items.sort(key=lambda t: (index[t[0]], t[1]))
        images = np.stack([_decode_image(read(), f"{split}/{c}/{f}") for c, f, read in items])
        labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
        names = np.array([f"{split}/{c}/{f}" for c, f, _ in items])
        out[split] = Arrays(images, labels, len(classes), names)
    return out


def _read_imagefolder(path: Path) -> dict[str, Arrays]:
    if path.is_dir():
        def entries():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    yield p.relative_to(path).parts, p.read_bytes
        return _collect_imagefolder(entries())
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as tar:
                members = {}
                for m in tar:
                    if m.isfile():
                        members[tuple(Path(m.name).parts)] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"--data-dir {path}: not a readable tar archive ({exc})") from None
        return _collect_imagefolder((parts, (lambda raw=raw: raw)) for parts, raw in members.items())
    raise UserError(f"--data-dir {path}: neither a directory with train/ and test/ nor a .tar.gz of one")


def _read_torchvision(cfg) -> dict[str, Arrays]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    root = str(Path(cfg.data_dir).expanduser())
    out = {}
    for split in ("train", "test"):
        try:
            ds = cls(root=root, train=split == "train", download=cfg.download)
        except RuntimeError as exc:
            if "not found" in str(exc).lower():
                raise UserError(f"{cfg.dataset} not found under --data-dir {cfg.data_dir} "
                                f"(add --download to fetch it, or point --data-dir at a copy)") from None
            raise UserError(f"{cfg.dataset} under {cfg.data_dir} is unreadable: {exc}") from None
        except OSError as exc:  # URLError and socket errors while downloading
            raise UserError(f"could not download {cfg.dataset} into {cfg.data_dir}: {exc}") from None
        out[split] = Arrays(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64),
                            len(ds.classes), index_names(split, len(ds.targets)))
    return out


def _make_synthetic(cfg) -> dict[str, Arrays]:
    """Seeded CIFAR-shaped images: a fixed random prototype per class plus noise, so a model can learn."""
    rng = np.random.default_rng(SYNTHETIC_DATA_SEED)
    prototypes = rng.integers(0, 256, size=(cfg.num_classes, IMAGE_SIZE, IMAGE_SIZE, 3))
    out = {}
    for split, n in (("train", cfg.synthetic_train), ("test", cfg.synthetic_test)):
        labels = rng.integers(0, cfg.num_classes, size=n).astype(np.int64)
        noise = rng.integers(0, 256, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3))
        images = ((prototypes[labels] + noise) // 2).astype(np.uint8)
        out[split] = Arrays(images, labels, cfg.num_classes, index_names(split, n))
    return out


def _decode_source(cfg) -> dict[str, Arrays]:
    if cfg.dataset == "synthetic":
        return _make_synthetic(cfg)
    if cfg.dataset in ("cifar10", "cifar100"):
        return _read_torchvision(cfg)
    return _read_imagefolder(Path(cfg.data_dir).expanduser().resolve())


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # hospitals on one host decode once, the others wait
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


CACHED_PARTS = ("images", "labels", "names")


def _cache_paths(cfg) -> dict[str, Path]:
    name, digest = _source_key(cfg)
    root = Path(cfg.cache_dir).expanduser()
    stem = f"{name}-{digest}"
    return {f"{split}.{part}": root / f"{stem}.{split}.{part}.npy"
            for split in ("train", "test") for part in CACHED_PARTS} | {"lock": root / f"{stem}.lock"}


def prepare(cfg) -> None:
    """Decode cfg's source into the cache unless it is there. Safe to call from many processes at once."""
    paths = _cache_paths(cfg)
    if all(p.exists() for k, p in paths.items() if k != "lock"):
        return
    with _locked(paths["lock"]):
        if all(p.exists() for k, p in paths.items() if k != "lock"):
            return
        decoded = _decode_source(cfg)
        for split, arrays in decoded.items():
            for part in CACHED_PARTS:
                array = getattr(arrays, part)
                final = paths[f"{split}.{part}"]
                tmp = final.with_suffix(f".tmp{os.getpid()}.npy")
                np.save(tmp, array)
                os.replace(tmp, final)  # readers never see a half-written cache file


def load_split(cfg, split: str) -> Arrays:
    """Memory-mapped uint8 images and labels of one split, after --limit-train/--limit-test."""
    prepare(cfg)
    paths = _cache_paths(cfg)
    images = np.load(paths[f"{split}.images"], mmap_mode="r")
    labels = np.load(paths[f"{split}.labels"])
    names = np.load(paths[f"{split}.names"])
    found = int(labels.max()) + 1 if len(labels) else 0
    if found > cfg.num_classes:
        raise UserError(f"{cfg.dataset} at {cfg.data_dir} has {found} classes but the model has {cfg.num_classes} "
                        f"outputs (set --num-classes)")
    limit = cfg.limit_train if split == "train" else cfg.limit_test
    if limit:
        if limit > len(labels):
            raise UserError(f"--limit-{split} {limit} exceeds the {len(labels)} {split} samples")
        order = np.sort(np.random.default_rng(LIMIT_ORDER_SEED).permutation(len(labels))[:limit])
        return Arrays(RowView(images, order), labels[order], cfg.num_classes, names[order])
    return Arrays(RowView(images, np.arange(len(labels))), labels, cfg.num_classes, names)


class RowView:
    """A lazy row selection of a memory-mapped array: nothing is read until indexed."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self):
        return len(self.rows)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.array[self.rows[positions]])


# --------------------------------------------------------------------------- partitions
def partition(labels: np.ndarray, hospitals: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Disjoint sorted index arrays, one per hospital, reproducible from seed."""
    rng = np.random.default_rng([seed, 0xDA7A])
    n = len(labels)
    if n < hospitals:
        raise UserError(f"{n} training samples cannot be shared by {hospitals} hospitals")
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), hospitals)]
    # Dirichlet label skew (Hsu et al., 2019): each class is split over hospitals by
    # proportions drawn from Dir(alpha); redrawn until every shard has a minimum size.
    classes = np.unique(labels)
    min_size = min(DIRICHLET_MIN_SHARD, n // hospitals)
    for _ in range(DIRICHLET_MAX_DRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(hospitals)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(hospitals, alpha))) * len(members)).astype(int)[:-1]
            for h, part in enumerate(np.split(members, cuts)):
                shards[h].append(part)
        result = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(r) for r in result) >= min_size:
            return result
    raise UserError(f"--partition dirichlet --alpha {alpha}: could not give every one of {hospitals} hospitals "
                    f"{min_size} samples in {DIRICHLET_MAX_DRAWS} draws; raise --alpha or use fewer hospitals")


# --------------------------------------------------------------------------- batches
def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


ORDER, AUGMENT, NOISE, EVAL_NOISE, CODEC, LABEL_DP, LABEL_DEFENCE = 1, 2, 3, 4, 5, 6, 7  # seed domains


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image, and a horizontal flip, per sample."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    cols = torch.where(flip[:, None, None], cols.flip(2), cols)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


class Normalizer:
    """uint8 images to normalised floats of the run's dtype."""

    def __init__(self, cfg):
        mean, std = NORMALIZATION[cfg.dataset]
        dtype = getattr(torch, cfg.dtype)
        self.mean = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1) * 255

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.to(self.mean.dtype) - self.mean) / self.std


class Shard:
    """One hospital's training shard in memory, and its deterministic batches."""

    def __init__(self, cfg, hospital: int, images: np.ndarray, labels: np.ndarray, names: np.ndarray):
        self.cfg, self.hospital = cfg, hospital
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        self.labels = torch.from_numpy(labels)
        self.names = names
        # --label-defence rr: the labels the U-shaped tail trains on, drawn once per record (None: the labels).
        self.targets: torch.Tensor | None = None
        self.normalize = Normalizer(cfg)
        self._check_size()

    def _check_size(self) -> None:
        if len(self.labels) < self.cfg.batch_size:
            raise UserError(f"hospital{self.hospital} holds {len(self.labels)} training samples, fewer than "
                            f"--batch-size {self.cfg.batch_size}; lower it or give hospitals more data")

    def drop(self, positions: list[int]) -> None:
        """Remove records (deduplication); batches are then drawn from what remains."""
        keep = np.setdiff1d(np.arange(len(self.labels)), np.asarray(positions, dtype=np.int64))
        index = torch.from_numpy(keep)
        self.images, self.labels, self.names = self.images[index], self.labels[index], self.names[keep]
        if self.targets is not None:
            self.targets = self.targets[index]
        self._check_size()

    def __len__(self):
        return len(self.labels)

    @property
    def num_batches(self) -> int:
        return len(self.labels) // self.cfg.batch_size  # last partial batch dropped: every step has full batches

    def rows(self, epoch: int, index: int) -> torch.Tensor:
        """Positions in the shard of training batch ``index`` of ``epoch``."""
        cfg = self.cfg
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(
            derived_seed(cfg.seed, ORDER, self.hospital, epoch)))
        return order[index * cfg.batch_size:(index + 1) * cfg.batch_size]

    def batch_targets(self, epoch: int, index: int) -> torch.Tensor:
        """What the loss of training batch ``index`` of ``epoch`` is computed against (``targets`` or the labels)."""
        return (self.labels if self.targets is None else self.targets)[self.rows(epoch, index)]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rows = self.rows(epoch, index)
        images = self.images[rows]
        if cfg.augment:
            images = augment(images, torch.Generator().manual_seed(
                derived_seed(cfg.seed, AUGMENT, self.hospital, epoch, index)))
        return self.normalize(images), self.labels[rows]


class TestSet:
    """The test split every party evaluates on, in fixed batches (no augmentation)."""

    def __init__(self, cfg, arrays: Arrays):
        self.images = torch.from_numpy(arrays.images.take(np.arange(len(arrays.images)))).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(arrays.labels)
        self.batch_size = cfg.eval_batch_size
        self.normalize = Normalizer(cfg)

    @property
    def num_batches(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.normalize(self.images[s]), self.labels[s]


def shard_indices(cfg, labels: np.ndarray) -> list[np.ndarray]:
    """Every hospital's training indices: the partition, then --overlap's copies (duplicates)."""
    parts = partition(labels, cfg.hospitals, cfg.partition, cfg.alpha, cfg.seed)
    if cfg.overlap > 0:
        parts = apply_overlap(parts, cfg.overlap, cfg.seed)
    return parts


def load_shard(cfg, hospital: int) -> Shard:
    """Hospital ``hospital`` (1-based) materialises only its own rows of the training set."""
    train = load_split(cfg, "train")
    mine = shard_indices(cfg, train.labels)[hospital - 1]
    return Shard(cfg, hospital, train.images.take(mine), train.labels[mine], train.names[mine])


def load_all(cfg) -> tuple[list, "TestSet"]:
    """Every hospital's shard and the test set, for the one-process methods that hold them all."""
    return [load_shard(cfg, h) for h in range(1, cfg.hospitals + 1)], load_test(cfg)


def load_test(cfg) -> TestSet:
    return TestSet(cfg, load_split(cfg, "test"))


# --------------------------------------------------------------------------- step plan
def epoch_plan(batches_per_hospital: list[int], schedule: str) -> list[list[tuple[int, int]]]:
    """The optimizer steps of one epoch, each a list of (hospital, batch index).

    sequential: hospitals take turns, one hospital batch per step (round robin);
    parallel: every hospital that still has a batch contributes to each step.
    """
    longest = max(batches_per_hospital)
    steps = []
    for b in range(longest):
        present = [(h, b) for h, n in enumerate(batches_per_hospital, start=1) if b < n]
        if schedule == "parallel":
            steps.append(present)
        else:
            steps.extend([p] for p in present)
    return steps


def label_histogram(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()
