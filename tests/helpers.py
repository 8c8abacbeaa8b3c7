"""Shared test helpers: tiny datasets in real on-disk formats, configs on disk."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import yaml


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar(root, name, n_train=20, n_test=10, seed=0):
    """A tiny archive in the exact python-pickle layout of the official CIFAR release."""
    rng = np.random.default_rng(seed)
    sums = {}
    if name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            obj = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                   "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": rng.integers(0, 20, n).tolist(),
                   "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
            sums[split] = _write_pickle(folder / split, obj)
        sums["meta"] = _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                                       "coarse_label_names": [f"s{i}" for i in range(20)]})
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for split in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            n = n_test if split == "test_batch" else n_train // 5
            obj = {"batch_label": split, "labels": rng.integers(0, 10, n).tolist(),
                   "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [""] * n}
            sums[split] = _write_pickle(folder / split, obj)
        sums["batches.meta"] = _write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return sums



def write_config(path, **sections) -> str:
    """A small, fast experiment on synthetic 16-px data; keyword sections override/extend it."""
    cfg = {
        "seed": 0,
        "output_dir": str(path.parent / "run"),
        "data": {"name": "synthetic", "synthetic_samples": 96, "synthetic_classes": 10, "image_size": 16,
                 "batch_size": 16, "eval_batch_size": 64},
        "model": {"name": "resnet8", "num_classes": 10},
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "epochs": 2, "milestones": [1]},
        "train": {"progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
