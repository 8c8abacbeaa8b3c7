"""Datasets as in-memory arrays: CIFAR-10/100 (torchvision, checksummed), decoded image folders
(content-keyed disk cache) and a synthetic set for tests.

Every loader returns an :class:`ArrayDataset`: ``images`` uint8 ``[N, H, W, 3]`` (channels last,
as decoded), ``labels`` int64 ``[N]`` and ``classes``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ArrayDataset:
    images: Tensor  # uint8 [N, H, W, 3]
    labels: Tensor  # int64 [N]
    classes: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape [{self.images.shape[0]}], got {tuple(self.labels.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None, seed: int = 0) -> ArrayDataset:
        """A class-balanced-in-expectation random subset of ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ArrayDataset(self.images[idx], self.labels[idx], self.classes)


# ----------------------------------------------------------------------------- CIFAR
def _torchvision_cifar(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]


def cifar_checksums(name: str) -> dict[str, str]:
    """md5 of the official archive and of every file in it (from torchvision)."""
    cls = _torchvision_cifar(name)
    return ({f: md5 for f, md5 in cls.train_list + cls.test_list} | {cls.meta["filename"]: cls.meta["md5"]}
            | {cls.filename: cls.tgz_md5})


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else ""


def load_cifar(root: str | os.PathLike, name: str = "cifar100", train: bool = True, download: bool = False,
               checksums: dict[str, str] | None = None, verify: bool = True) -> ArrayDataset:
    """CIFAR-10/100 from ``root/cifar-{10-batches,100}-py`` through torchvision's reader.

    Files are verified against ``checksums`` (default: the official md5s; ``verify=False`` accepts
    the files as they are, e.g. a re-pickled or subsampled copy). With ``download=True``
    torchvision fetches and verifies the archive; without network, the error names the file to
    fetch and where to put it.
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    base = _torchvision_cifar(name)
    sums = checksums or cifar_checksums(name)
    if not verify:
        sums = {f: _md5(Path(root) / base.base_folder / f) for f in sums if f != base.filename}
    attrs = {
        "tgz_md5": sums.get(base.filename, base.tgz_md5),  # the archive, checked before extracting
        "train_list": [[f, sums[f]] for f, _ in base.train_list],
        "test_list": [[f, sums[f]] for f, _ in base.test_list],
        "meta": {**base.meta, "md5": sums[base.meta["filename"]]},
    }
    checked = type(base.__name__, (base,), attrs)
    root = os.fspath(root)
    try:
        ds = checked(root, train=train, download=download)
    except RuntimeError as e:
        folder = Path(root) / base.base_folder
        raise FileNotFoundError(
            f"{name} not found or corrupted under {folder} ({e}). Download {base.url} (md5 {base.tgz_md5}) and "
            f"extract it into {root} so that {folder}/{base.train_list[0][0]} exists, or pass download=True "
            f"where a network is available."
        ) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data))
    return ArrayDataset(images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes))


# ----------------------------------------------------------------------------- image folders
def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """``root/<class>/<image>`` files sorted by class (alphabetical = label order) and name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                files.append(f)
                labels.append(i)
    if not files:
        raise FileNotFoundError(f"{root} holds no images with extensions {IMAGE_EXTS}")
    return files, labels, classes


def _content_key(root: Path, files: list[Path]) -> str:
    """sha256 over every file's relative path and bytes: any change gives a new key."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("NKD_CACHE_DIR", Path.home() / ".cache" / "nkd"))


def load_image_folder(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      use_cache: bool = True) -> ArrayDataset:
    """Decode a folder of equally sized images once into uint8 ``[N, H, W, 3]``.

    The decoded array is cached under ``cache_dir`` (default ``$NKD_CACHE_DIR`` or
    ``~/.cache/nkd``) in a file named by the content hash of the folder, so a changed dataset is
    never served stale. Decoding uses Pillow.
    """
    from PIL import Image

    root = Path(root)
    files, labels, classes = list_image_folder(root)
    key = _content_key(root, files)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"imagefolder-{key}.pt"
    if use_cache and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return ArrayDataset(blob["images"], blob["labels"], list(blob["classes"]))
    decoded = []
    for f in files:
        with Image.open(f) as im:
            decoded.append(torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)))
    shapes = {tuple(d.shape) for d in decoded}
    if len(shapes) != 1:
        raise ValueError(f"{root}: images differ in size {sorted(shapes)[:4]}; use the ImageNet-style loader instead")
    ds = ArrayDataset(torch.stack(decoded), torch.tensor(labels, dtype=torch.long), classes)
    if use_cache:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": ds.images, "labels": ds.labels, "classes": classes}, tmp)
        os.replace(tmp, path)
    return ds


# ----------------------------------------------------------------------------- synthetic
def synthetic(num_samples: int = 512, num_classes: int = 10, size: int = 32, seed: int = 0,
              noise: float = 40.0, split: str = "train") -> ArrayDataset:
    """Learnable random images: each class has its own mean colour pattern (fixed by ``seed``) plus
    noise; ``split`` draws a different sample of the same classes."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, size, size, 3, generator=g) * 255
    g.manual_seed(seed * 7919 + {"train": 1, "test": 2}[split])
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    imgs = protos[labels] + torch.randn(num_samples, size, size, 3, generator=g) * noise
    return ArrayDataset(imgs.clamp(0, 255).round().to(torch.uint8), labels, [f"class{i}" for i in range(num_classes)])


# ----------------------------------------------------------------------------- digits
def load_digits(train: bool = True, test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """scikit-learn's handwritten digits (1,797 real 8×8 images, 10 classes; ships with the
    package, no download) as uint8 RGB, split into a fixed stratified train/test partition."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install 'nkd[demo]'") from e
    d = _load()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))
    labels = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of each class
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    keep = ~test_mask if train else test_mask
    rgb = images[keep][..., None].expand(-1, -1, -1, 3).contiguous()
    return ArrayDataset(rgb, labels[keep], [str(i) for i in range(10)])
