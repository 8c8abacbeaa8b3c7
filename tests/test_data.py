"""nkd.data: CIFAR pickle archives through torchvision, image folders + cache, augmentation statistics."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402

from helpers import make_cifar  # noqa: E402
from nkd.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    DeviceLoader,
    MixupCutmix,
    folder_loader,
    load_cifar,
    load_image_folder,
    synthetic,
)


@pytest.mark.parametrize("name,classes", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_pickle_archive_reads_through_torchvision(tmp_path, name, classes):
    sums = make_cifar(tmp_path, name)
    train = load_cifar(tmp_path, name, train=True, checksums=sums)
    test = load_cifar(tmp_path, name, train=False, checksums=sums)
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == torch.uint8
    assert test.images.shape == (10, 32, 32, 3)
    assert train.num_classes == classes
    # pixel layout: the 3072 bytes are R plane, G plane, B plane of a 32x32 image
    folder = next(tmp_path.iterdir())
    split = "train" if name == "cifar100" else "data_batch_1"
    with open(folder / split, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0).copy())
    assert torch.equal(train.images[0], first)
    key = "fine_labels" if name == "cifar100" else "labels"
    assert train.labels[0].item() == raw[key][0]


def test_cifar_tar_gz_archive_is_verified_and_extracted_offline(tmp_path):
    """The download path: an archive already in root with the right md5 is not fetched again but
    verified and extracted by torchvision, then read."""
    import tarfile

    build = tmp_path / "build"
    sums = make_cifar(build, "cifar100")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(build / "cifar-100-python", arcname="cifar-100-python")
    sums["cifar-100-python.tar.gz"] = hashlib.md5(archive.read_bytes()).hexdigest()
    ds = load_cifar(root, "cifar100", train=True, download=True, checksums=sums)
    assert len(ds) == 20 and (root / "cifar-100-python" / "train").is_file()
    assert torch.equal(ds.images, load_cifar(build, "cifar100", train=True, checksums=sums).images)


def test_cifar_checksum_mismatch_and_missing_files_are_clear_errors(tmp_path):
    sums = make_cifar(tmp_path, "cifar100")
    bad = dict(sums, train="0" * 32)
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        load_cifar(tmp_path, "cifar100", checksums=bad)
    with pytest.raises(FileNotFoundError, match="official|cifar-100-python"):
        load_cifar(tmp_path / "elsewhere", "cifar100")  # default (official) checksums, nothing there


def make_folder(root, n_per_class=3, classes=("b_cat", "a_dog"), size=8, ext="png"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.{ext}")


def test_image_folder_decodes_and_caches_by_content(tmp_path):
    root, cache = tmp_path / "train", tmp_path / "cache"
    make_folder(root)
    ds = load_image_folder(root, cache_dir=cache)
    assert ds.classes == ["a_dog", "b_cat"]  # alphabetical = label order
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.from_numpy(np.array(Image.open(root / "a_dog" / "0.png").convert("RGB")))
    assert torch.equal(ds.images[0], expected)
    assert len(list(cache.iterdir())) == 1
    again = load_image_folder(root, cache_dir=cache)
    assert torch.equal(again.images, ds.images)
    # change one image: a new cache entry, the new pixels served
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a_dog" / "0.png")
    changed = load_image_folder(root, cache_dir=cache)
    assert changed.images[0].sum() == 0
    assert len(list(cache.iterdir())) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class sub-folders"):
        load_image_folder(tmp_path / "empty")


def test_synthetic_is_deterministic():
    a, b = synthetic(64, 5, seed=3), synthetic(64, 5, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (64, 32, 32, 3)


def _marker_dataset(n):
    """Each image: zeros with a red pixel at (16, 16) and a green one at (16, 17)."""
    from nkd.data import ArrayDataset

    imgs = torch.zeros(n, 32, 32, 3, dtype=torch.uint8)
    imgs[:, 16, 16, 0] = 255
    imgs[:, 16, 17, 1] = 255
    return ArrayDataset(imgs, torch.zeros(n, dtype=torch.long), ["x"])


def test_crop_offsets_uniform_and_flip_rate_half():
    n = 9000
    dl = DeviceLoader(_marker_dataset(n), 1000, train=True, mean=(0, 0, 0), std=(1 / 255,) * 3, seed=0)
    dys, dxs, flips = [], [], []
    for x, _ in dl:
        red = x[:, 0] > 0
        green = x[:, 1] > 0
        for r, gm in zip(red, green):
            (ry, rx), (_, gx) = r.nonzero()[0].tolist(), gm.nonzero()[0].tolist()
            flipped = gx < rx
            # unflipped: column = 16 - (ox - 4); flipped: mirrored in the 32-px crop
            col = 31 - rx if flipped else rx
            dys.append(16 - ry)
            dxs.append(16 - col)
            flips.append(flipped)
    assert len(dys) == n
    for d in (dys, dxs):
        counts = np.bincount(np.asarray(d) + 4, minlength=9)
        assert len(counts) == 9 and set(np.unique(d)) == set(range(-4, 5))
        assert np.all(np.abs(counts / n - 1 / 9) < 0.02), counts
    assert abs(np.mean(flips) - 0.5) < 0.02


def test_eval_batches_are_normalized_and_unaugmented():
    ds = synthetic(10, 3)
    dl = DeviceLoader(ds, 4, train=False, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    xs = torch.cat([x for x, _ in dl])
    ref = (ds.images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(xs, ref)
    assert len(dl) == 3


def test_mixup_cutmix_rows_sum_to_one():
    ds = synthetic(256, 7)
    mix = MixupCutmix(7, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    dl = DeviceLoader(ds, 64, train=True, mean=CIFAR10_MEAN, std=CIFAR10_STD, mix=mix)
    mixed_rows = 0
    for _, y in dl:
        assert y.shape == (64, 7)
        torch.testing.assert_close(y.sum(1), torch.ones(64))
        assert (y >= 0).all()
        mixed_rows += int(((y > 0.5 / 7).sum(1) >= 2).sum())
    assert mixed_rows > 0


def test_two_ranks_see_exactly_the_global_batch_of_one_process():
    ds = synthetic(200, 4)
    kw = dict(train=True, mean=CIFAR10_MEAN, std=CIFAR10_STD, seed=5)
    one = DeviceLoader(ds, 32, **kw)
    r0 = DeviceLoader(ds, 16, rank=0, world_size=2, **kw)
    r1 = DeviceLoader(ds, 16, rank=1, world_size=2, **kw)
    for d in (one, r0, r1):
        d.set_epoch(2)
    assert len(one) == len(r0) == 6
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        torch.testing.assert_close(x, torch.cat([x0, x1]))
        assert torch.equal(y, torch.cat([y0, y1]))
    # a different epoch gives a different order
    one.set_epoch(3)
    assert not torch.equal(next(iter(one))[1], next(iter(r0))[1][:16].repeat(2))


def test_folder_loader_order_is_a_function_of_seed_and_epoch(tmp_path):
    """What a resume relies on: epoch e's sample order is the same in a fresh process, and
    train_batches(k) continues it from batch k. Evaluation shards see every image exactly once."""
    from nkd.data.build import Loaders

    make_folder(tmp_path / "train", n_per_class=8, size=40, ext="jpg")

    def labels(start=0, epoch=2):
        loader, sampler, _ = folder_loader(str(tmp_path / "train"), 2, train=True, image_size=32, num_workers=0,
                                           pin_memory=False, seed=5)
        ld = Loaders(loader, None, 2, sampler)
        ld.set_epoch(epoch)
        return [y.tolist() for _, y in ld.train_batches(start)]

    full = labels()
    assert len(full) == 8 and full == labels() and labels(start=3) == full[3:]
    assert labels(epoch=3) != full  # reshuffled per epoch
    seen = []
    for rank in (0, 1, 2):  # 16 images over 3 ranks: a padding sampler would give 18
        ev, none, _ = folder_loader(str(tmp_path / "train"), 3, train=False, image_size=32, num_workers=0,
                                    pin_memory=False, rank=rank, world_size=3)
        seen += [len(b[1]) for b in ev]
        assert none is None
    assert sum(seen) == 16


def test_folder_loader_imagenet_style(tmp_path):
    make_folder(tmp_path / "train", size=40, ext="jpg")
    loader, sampler, classes = folder_loader(str(tmp_path / "train"), 4, train=True, image_size=32, num_workers=0,
                                             pin_memory=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and classes == ["a_dog", "b_cat"] and sampler is not None
    loader, _, _ = folder_loader(str(tmp_path / "train"), 4, train=False, image_size=32, num_workers=0,
                                 pin_memory=False)
    assert sum(len(b[1]) for b in loader) == 6
