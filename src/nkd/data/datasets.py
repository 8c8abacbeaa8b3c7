"""Datasets as in-memory arrays: CIFAR-10/100 (torchvision, checksummed), decoded image folders
(content-keyed disk cache) and a synthetic set for tests.

Every loader returns an :class:`ArrayDataset`: ``images`` uint8 ``[N, H, W, 3]`` (channels last,
as decoded), ``labels`` int64 ``[N]`` and ``classes``.

Image folders (``root/<class>/<image>``, classes = the non-hidden sub-folders in alphabetical
order = label order) are decoded once with Pillow:

* every image is converted to RGB (grayscale ``L``, 1-bit ``1``, palette ``P``, ``RGBA`` …: one
  log line per folder names the modes converted; gray values are copied to the three channels);
* with ``image_size=s`` (``data.image_size``) every image is resized to ``s×s`` with Pillow's
  bilinear filter (``Image.Resampling.BILINEAR``: a triangle filter whose support widens by the
  shrink factor, i.e. antialiased when shrinking). The aspect ratio is not kept (a non-square
  image is stretched to a square); images that already are ``s×s`` are left untouched, so images
  of different sizes are accepted. Without ``image_size`` all images must have one size;
* per-channel statistics of the decoded (resized) pixels, ``mean_c = Σx/(255·n)``,
  ``std_c = sqrt(Σx²/(255²·n) − mean_c²)`` over the ``n = N·H·W`` pixels (population std), are
  computed from exact per-channel histograms.

The result is cached under ``cache_dir`` as ``imagefolder-v2-<content hash>-<size tag>.pt`` (images,
labels, classes) plus a ``.json`` sidecar with the statistics and the conversion notes, so the
statistics of a decoded split can be read without loading its pixels
(:func:`image_folder_stats`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RESAMPLE = "bilinear"  # Pillow's Image.Resampling.BILINEAR (antialiased when shrinking)
_CACHE_VERSION = "v2"  # bump when the decode changes

log = logging.getLogger("nkd")


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean/std of uint8 images on the [0, 1] scale, and the number of images."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_images: int


def channel_stats(images: Tensor) -> ChannelStats:
    """``mean_c = Σx/(255·n)``, ``std_c = sqrt(Σx²/(255²·n) − mean_c²)`` over all ``n`` pixels of
    uint8 ``[N, H, W, 3]`` images, from exact per-channel histograms (``Σx = Σ_v v·count_c(v)``)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be non-empty uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    counts = torch.stack([torch.bincount(images[..., c].flatten(), minlength=256) for c in range(3)]).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    n = counts[0].sum()
    mean = counts @ v / n
    var = (counts @ (v * v) / n - mean**2).clamp_min(0)
    return ChannelStats(tuple(mean.tolist()), tuple(var.sqrt().tolist()), int(images.shape[0]))


@dataclass
class ArrayDataset:
    images: Tensor  # uint8 [N, H, W, 3]
    labels: Tensor  # int64 [N]
    classes: list[str]
    stats: ChannelStats | None = None  # of the whole decoded split (image folders); kept by subset()

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
        return ArrayDataset(self.images[idx], self.labels[idx], self.classes, self.stats)


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
    (``data.download``) torchvision fetches and verifies the archive — or, if the archive already
    lies in ``root`` with the right md5, verifies and extracts it without a network. Missing files
    and failed downloads (no network) raise :class:`FileNotFoundError` naming the file to fetch,
    its md5 and where to put it.
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
    made = _first_missing(Path(root))  # a folder the download creates is removed again if it fails
    try:
        ds = checked(root, train=train, download=download)
    except RuntimeError as e:  # torchvision: files missing or failing their md5
        _remove_if_empty(made)
        why = str(e).split(" You can use download=True")[0].strip()  # torchvision's own advice names its argument
        raise FileNotFoundError(f"{name} not found or corrupted under {Path(root) / base.base_folder} ({why}). "
                                + _cifar_where(name, root, base, download)) from e
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, OSError) as e:
        _remove_if_empty(made)
        raise FileNotFoundError(f"{name}: could not download {base.url} ({e}). "
                                + _cifar_where(name, root, base, download)) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data))
    return ArrayDataset(images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes))


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (None if it exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_if_empty(top: Path | None) -> None:
    """Remove ``top`` (a folder this process created) when nothing but empty folders lie in it."""
    if top is None or not top.is_dir():
        return
    if any(p.is_file() or p.is_symlink() for p in top.rglob("*")):
        return
    import shutil

    shutil.rmtree(top, ignore_errors=True)


def _cifar_where(name: str, root: str, base, download: bool) -> str:
    """Which file to fetch, its md5, where to put it, and which config key to set."""
    folder = Path(root) / base.base_folder
    archive = Path(root) / base.filename
    how = (f"Fetch {base.url} (md5 {base.tgz_md5}) where a network is available and extract it into {root} so "
           f"that {folder / base.train_list[0][0]} exists")
    if download:
        return (how + f", then set data.download=false after placing the files (or place the archive itself at "
                f"{archive}: with data.download=true it is verified and extracted there without a download).")
    return how + ", or set data.download=true where a network is available."


# ----------------------------------------------------------------------------- image folders
def class_dirs(root: str | os.PathLike) -> list[str]:
    """The class sub-folders of ``root``: its non-hidden directories, sorted (index = label)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """``root/<class>/<image>`` files sorted by class (alphabetical = label order) and name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected {root}/<class>/<image>)")
    classes = class_dirs(root)
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


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size (data.image_size) must be a positive int or None, got {image_size!r}")


def _cache_paths(root: Path, files: list[Path], cache_dir, image_size: int | None) -> tuple[Path, Path]:
    """(images blob, statistics sidecar) for this folder content and decode size."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = "native" if image_size is None else f"{image_size}px-{RESAMPLE}"
    stem = f"imagefolder-{_CACHE_VERSION}-{_content_key(root, files)}-{tag}"
    return cache / f"{stem}.pt", cache / f"{stem}.json"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


_MODE_NAMES = {"1": "1-bit", "L": "grayscale", "LA": "grayscale+alpha", "P": "palette", "PA": "palette+alpha",
               "RGBA": "RGBA (alpha dropped)", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV",
               "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale"}


def _to_rgb(im):
    """A Pillow image as 8-bit RGB. 16-bit grayscale keeps its top 8 bits (``x >> 8``); 32-bit
    integer/float images have no defined 8-bit range and are refused."""
    from PIL import Image

    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), mode="L").convert("RGB")
    if im.mode in ("I", "F"):
        raise ValueError(f"{im.filename}: mode {im.mode} (32-bit) images are not supported; save them as 8-bit")
    return im.convert("RGB") if im.mode != "RGB" else im


def _decode(files: list[Path], image_size: int | None) -> tuple[list[Tensor], dict]:
    from PIL import Image

    decoded, modes, resized_from, num_resized = [], {}, set(), 0
    for f in files:
        with Image.open(f) as im:
            modes[im.mode] = modes.get(im.mode, 0) + 1
            rgb = _to_rgb(im)
            if image_size is not None and rgb.size != (image_size, image_size):
                resized_from.add(rgb.size)
                num_resized += 1
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            decoded.append(torch.from_numpy(np.array(rgb, dtype=np.uint8)))
    return decoded, {"modes": modes, "resized_from": sorted(resized_from)[:8], "num_resized": num_resized}


def _log_notes(root: Path, notes: dict, n: int, image_size: int | None) -> None:
    """One line per kind of conversion, once per folder load."""
    other = {m: c for m, c in notes.get("modes", {}).items() if m != "RGB"}
    if other:
        names = "/".join(dict.fromkeys(_MODE_NAMES.get(m, m) for m in other))
        log.info("%s: %d of %d images are %s (mode %s): converted to RGB", root, sum(other.values()), n, names,
                 "/".join(other))
    if notes.get("resized_from"):
        sizes = ", ".join(f"{w}×{h}" for w, h in notes["resized_from"])
        log.info("%s: %d of %d images (sizes %s) resized to %d×%d (data.image_size; Pillow bilinear, antialiased)",
                 root, notes.get("num_resized", 0), n, sizes, image_size, image_size)


def _write_sidecar(path: Path, stats: ChannelStats, notes: dict) -> None:
    blob = {"mean": stats.mean, "std": stats.std, "num_images": stats.num_images, **notes}
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(blob)))


def _read_sidecar(path: Path) -> tuple[ChannelStats, dict] | None:
    try:
        blob = json.loads(path.read_text())
        stats = ChannelStats(tuple(blob["mean"]), tuple(blob["std"]), int(blob["num_images"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: recomputed
    notes = {"modes": blob.get("modes", {}), "resized_from": [tuple(s) for s in blob.get("resized_from", [])],
             "num_resized": blob.get("num_resized", 0)}
    return stats, notes


def load_image_folder(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      use_cache: bool = True, image_size: int | None = None) -> ArrayDataset:
    """Decode a folder of images once into uint8 ``[N, H, W, 3]`` (see the module docstring).

    ``image_size=s``: every image not already ``s×s`` is resized to ``s×s`` (Pillow bilinear,
    antialiased; aspect not kept), so sizes may differ. ``None``: images are kept as they are and
    must all have one size. The returned dataset carries :class:`ChannelStats` of its pixels.

    The decoded array is cached under ``cache_dir`` (default ``$NKD_CACHE_DIR`` or
    ``~/.cache/nkd``) in a file named by the content hash of the folder and the decode size, so a
    changed dataset or size is never served stale.
    """
    return _Folder(root, cache_dir, use_cache, image_size).load()


def image_folder_stats(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                       image_size: int | None = None) -> ChannelStats:
    """:class:`ChannelStats` of the folder as :func:`load_image_folder` decodes it, read from the
    cache sidecar without loading the pixels when this content and size were decoded before
    (costs one hash pass over the files); otherwise the folder is decoded (and cached)."""
    folder = _Folder(root, cache_dir, use_cache, image_size)
    if use_cache:
        cached = _read_sidecar(folder.side)
        if cached is not None:
            return cached[0]
        if not folder.path.is_file():
            log.info("%s: no cached decode; decoding it to compute the normalization statistics", folder.root)
    return folder.load().stats


class _Folder:
    """One image folder at one decode size: its files and its cache entry (hashed once)."""

    def __init__(self, root, cache_dir, use_cache: bool, image_size: int | None):
        _check_image_size(image_size)
        self.root, self.use_cache, self.image_size = Path(root), use_cache, image_size
        self.files, self.labels, self.classes = list_image_folder(self.root)
        self.path = self.side = None
        if use_cache:
            self.path, self.side = _cache_paths(self.root, self.files, cache_dir, image_size)

    def load(self) -> ArrayDataset:
        root, n, size = self.root, len(self.files), self.image_size
        if self.use_cache and self.path.is_file():
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            cached = _read_sidecar(self.side)
            if cached is None:
                cached = channel_stats(blob["images"]), {}
                _write_sidecar(self.side, *cached)
            _log_notes(root, cached[1], n, size)
            return ArrayDataset(blob["images"], blob["labels"], list(blob["classes"]), cached[0])
        decoded, notes = _decode(self.files, size)
        shapes = {tuple(d.shape) for d in decoded}
        if len(shapes) != 1:
            raise ValueError(f"{root}: images differ in size {sorted(shapes)[:4]}; set data.image_size (image_size=) "
                             "to resize them all to one size, or use data.name=imagenet_folder")
        images = torch.stack(decoded)
        ds = ArrayDataset(images, torch.tensor(self.labels, dtype=torch.long), self.classes, channel_stats(images))
        _log_notes(root, notes, n, size)
        if self.use_cache:
            _atomic_write(self.path, lambda tmp: torch.save({"images": ds.images, "labels": ds.labels,
                                                             "classes": self.classes}, tmp))
            _write_sidecar(self.side, ds.stats, notes)
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
