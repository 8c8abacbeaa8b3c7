"""Every dataset's facts, in one place: :data:`DATASETS` maps ``data.name`` to a :class:`DatasetFacts`.

The config (allowed names, image-size and class-count checks, whether ``data.root`` is needed), the
loader builder (normalization constants, in-memory or folder pipeline, evaluation folders) and the
docs read them from here. Importing this module needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetFacts:
    """What is known about a dataset kind before anything is read.

    ``classes``: the class count when fixed (``None``: counted from the folders or the config);
    ``native_size``: the image side when images are used as stored (``data.image_size`` must then
    be left out); ``stats``: normalization ``(mean, std)`` on the 0–1 scale (``None``: computed from
    the training split); ``folder``: read from ``root/{train,val|test}/<class>/`` (``data.root``
    required); ``eval_dirs``: the evaluation folder names in the order they are looked for;
    ``default_size``: ``data.image_size`` when it is not given.
    """

    name: str
    doc: str
    classes: int | None = None
    native_size: int | None = None
    stats: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    folder: bool = False
    eval_dirs: tuple[str, ...] = ()
    default_size: int | None = None
    needs_root: bool = True


DATASETS: dict[str, DatasetFacts] = {f.name: f for f in (
    DatasetFacts("cifar100", "the official CIFAR-100 python archive", 100, 32, (CIFAR100_MEAN, CIFAR100_STD)),
    DatasetFacts("cifar10", "the official CIFAR-10 python archive", 10, 32, (CIFAR10_MEAN, CIFAR10_STD)),
    DatasetFacts("image_folder_small", "small images in class folders, decoded into memory", folder=True,
                 eval_dirs=("test", "val")),
    DatasetFacts("imagenet_folder", "ImageNet-style class folders read by worker processes",
                 stats=(IMAGENET_MEAN, IMAGENET_STD), folder=True, eval_dirs=("val", "test"), default_size=224),
    DatasetFacts("synthetic", "generated class patterns (tests, demos)", stats=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                 needs_root=False),
    DatasetFacts("digits", "scikit-learn's 8×8 digits", 10, 8, ((0.31, 0.31, 0.31), (0.38, 0.38, 0.38)),
                 needs_root=False),
)}
DATASET_NAMES = tuple(DATASETS)
