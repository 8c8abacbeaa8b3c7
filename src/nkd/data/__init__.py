"""Data: datasets as uint8 arrays, device-side augmentation, loaders."""

from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MixupCutmix,
    crop_flip_normalize,
    normalize_uint8,
)
from .datasets import ArrayDataset, cifar_checksums, load_cifar, load_image_folder, synthetic
from .loaders import DeviceLoader, folder_loader

__all__ = [
    "ArrayDataset", "DeviceLoader", "MixupCutmix", "folder_loader", "load_cifar", "load_image_folder", "synthetic",
    "cifar_checksums", "crop_flip_normalize", "normalize_uint8", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
    "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]
