"""torchvision's ImageFolder with nkd's class list (a module of its own: it imports torchvision,
and DataLoader workers unpickle the dataset by this module path)."""

from __future__ import annotations

from torchvision import datasets

from .datasets import class_dirs


class ImageFolder(datasets.ImageFolder):
    """Classes are :func:`~nkd.data.datasets.class_dirs` (hidden folders such as
    ``.ipynb_checkpoints`` are not classes), so the count agrees with ``dataset_num_classes``."""

    def find_classes(self, directory):
        classes = class_dirs(directory)
        if not classes:
            raise FileNotFoundError(f"{directory} has no class sub-folders (expected {directory}/<class>/<image>)")
        return classes, {c: i for i, c in enumerate(classes)}
