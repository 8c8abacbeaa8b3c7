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
    assert len(list(cache.glob("*.pt"))) == 1 and len(list(cache.glob("*.json"))) == 1  # images + statistics
    again = load_image_folder(root, cache_dir=cache)
    assert torch.equal(again.images, ds.images)
    # change one image: a new cache entry, the new pixels served
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a_dog" / "0.png")
    changed = load_image_folder(root, cache_dir=cache)
    assert changed.images[0].sum() == 0
    assert len(list(cache.glob("*.pt"))) == 2


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


# ----------------------------------------------------------------------------- issue 10: image folders, eval, offline
import logging  # noqa: E402
import socket  # noqa: E402
import warnings  # noqa: E402

from nkd.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from nkd.data.build import build_eval_loader, build_loaders, dataset_num_classes  # noqa: E402
from nkd.data.datasets import channel_stats, image_folder_stats  # noqa: E402


@pytest.fixture
def nkd_log():
    """Messages of the "nkd" logger at INFO (the trainer turns its propagation off, so caplog may miss them)."""
    logger, records = logging.getLogger("nkd"), []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def folder_cfg(tmp_path, root, name="image_folder_small", **data):
    kw = dict(name=name, root=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4, eval_batch_size=5,
              num_workers=0) | data
    return Config(data=DataConfig(**kw), model=ModelConfig(num_classes=2), train=TrainConfig(device="cpu"))


def write_gray(root, classes=("a", "b"), n=3, size=105, modes=("1", "L"), seed=0):
    """Omniglot-like: 1-bit and grayscale PNGs."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            px = rng.integers(0, 256, (size, size), dtype=np.uint8)
            im = Image.fromarray(px > 127) if modes[i % len(modes)] == "1" else Image.fromarray(px, mode="L")
            im.save(root / c / f"{i}.png")


def test_small_folder_is_resized_to_image_size(tmp_path):
    root = tmp_path / "data"
    write_gray(root / "train")
    write_gray(root / "test", n=2, seed=1)
    cache = tmp_path / "cache"
    ds = load_image_folder(root / "train", cache_dir=cache, image_size=32)
    assert ds.images.shape == (6, 32, 32, 3)
    f = root / "train" / "a" / "1.png"  # mode L
    ref = np.array(Image.open(f).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(ds.images[1], torch.from_numpy(ref))
    # already at the size: untouched pixels; the size is part of the cache key
    native = load_image_folder(root / "train", cache_dir=cache, image_size=105)
    assert torch.equal(native.images[1], torch.from_numpy(np.array(Image.open(f).convert("RGB"))))
    assert len(list(cache.glob("*.pt"))) == 2
    assert load_image_folder(root / "train", cache_dir=cache, image_size=32).images.shape[1] == 32  # cache hit
    # through the config: training and evaluation batches at data.image_size
    ld = build_loaders(folder_cfg(tmp_path, root, image_size=24), torch.device("cpu"))
    assert next(iter(ld.train))[0].shape == (4, 3, 24, 24)
    assert next(iter(ld.eval))[0].shape == (4, 3, 24, 24)


def test_small_folder_of_mixed_sizes_needs_image_size(tmp_path):
    make_folder(tmp_path / "a", classes=("x",), size=8)
    make_folder(tmp_path / "a", classes=("y",), size=12)
    with pytest.raises(ValueError, match=r"differ in size.*data\.image_size"):
        load_image_folder(tmp_path / "a", cache_dir=tmp_path / "c")
    ds = load_image_folder(tmp_path / "a", cache_dir=tmp_path / "c", image_size=10)
    assert ds.images.shape == (6, 10, 10, 3)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path / "a", cache_dir=tmp_path / "c", image_size=0)


def test_grayscale_and_1bit_are_converted_to_rgb_and_logged_once(tmp_path, nkd_log):
    write_gray(tmp_path / "g", n=4)
    ds = load_image_folder(tmp_path / "g", cache_dir=tmp_path / "c")
    assert torch.equal(ds.images[..., 0], ds.images[..., 1]) and torch.equal(ds.images[..., 0], ds.images[..., 2])
    assert set(ds.images[0].unique().tolist()) == {0, 255}  # the 1-bit image: black and white
    lines = [m for m in nkd_log if "converted to RGB" in m]
    assert len(lines) == 1, nkd_log
    assert "grayscale" in lines[0] and "1-bit" in lines[0] and "mode 1/L" in lines[0] and "8 of 8" in lines[0]
    assert not any("resized" in m for m in nkd_log)  # already 105×105


def test_16bit_grayscale_keeps_its_top_8_bits(tmp_path):
    (tmp_path / "f" / "c").mkdir(parents=True)
    px = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)
    Image.fromarray(px).save(tmp_path / "f" / "c" / "0.png")
    ds = load_image_folder(tmp_path / "f", cache_dir=tmp_path / "cache")
    assert torch.equal(ds.images[0, ..., 0], torch.from_numpy((px >> 8).astype(np.uint8)))  # Pillow alone clips at 255


def test_folder_normalization_is_computed_from_the_training_split(tmp_path, nkd_log):
    root = tmp_path / "data"
    make_folder(root / "train", n_per_class=4, size=8)
    make_folder(root / "test", n_per_class=1, size=8)
    ld = build_loaders(folder_cfg(tmp_path, root, image_size=8), torch.device("cpu"))
    x = ld.train.images.double() / 255  # the decoded training split
    mean, std = x.mean((0, 1, 2)), x.reshape(-1, 3).std(0, unbiased=False)
    torch.testing.assert_close(torch.tensor(ld.train.mean, dtype=torch.float64), mean)
    torch.testing.assert_close(torch.tensor(ld.train.std, dtype=torch.float64), std)
    assert ld.eval.mean == ld.train.mean and ld.eval.std == ld.train.std
    assert any("normalizing with mean" in m and "computed from the training split (8 images)" in m for m in nkd_log)
    # given values win; known datasets keep their constants
    given = build_loaders(folder_cfg(tmp_path, root, image_size=8, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5]), "cpu")
    assert given.train.mean == (0.1, 0.2, 0.3)
    syn = Config(data=DataConfig(name="synthetic", synthetic_samples=16, image_size=8))
    assert build_loaders(syn, "cpu").train.std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"data\.std: expected 3 positive"):
        build_loaders(folder_cfg(tmp_path, root, image_size=8, mean=[0.5] * 3, std=[0.5]), "cpu")


def test_channel_stats_exact():
    imgs = torch.randint(0, 256, (7, 5, 3, 3), dtype=torch.uint8)
    st = channel_stats(imgs)
    x = imgs.double().reshape(-1, 3) / 255
    torch.testing.assert_close(torch.tensor(st.mean, dtype=torch.float64), x.mean(0))
    torch.testing.assert_close(torch.tensor(st.std, dtype=torch.float64), x.std(0, unbiased=False))
    assert st.num_images == 7


def test_dataset_num_classes_without_decoding(tmp_path):
    root = tmp_path / "data"
    for c in ("x", "y", "z"):
        (root / "train" / c).mkdir(parents=True)
        (root / "train" / c / "0.jpg").write_bytes(b"not an image: nothing is decoded")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "notes.txt").write_text("a file, not a class")
    assert dataset_num_classes(folder_cfg(tmp_path, root).data) == 3
    assert dataset_num_classes(folder_cfg(tmp_path, root, name="imagenet_folder").data) == 3
    assert dataset_num_classes(folder_cfg(tmp_path, tmp_path / "missing").data) is None
    assert dataset_num_classes(DataConfig(name="image_folder_small", root=None)) is None
    assert dataset_num_classes(DataConfig(name="cifar100")) == 100
    assert dataset_num_classes(DataConfig(name="cifar10")) == 10
    assert dataset_num_classes(DataConfig(name="digits")) == 10
    assert dataset_num_classes(DataConfig(name="synthetic", synthetic_classes=7)) == 7


def test_hidden_folders_are_not_classes_in_either_folder_loader(tmp_path):
    make_folder(tmp_path / "train", size=40, ext="jpg")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    assert load_image_folder(tmp_path / "train", cache_dir=tmp_path / "c").classes == ["a_dog", "b_cat"]
    _, _, classes = folder_loader(str(tmp_path / "train"), 2, train=True, image_size=32, num_workers=0)
    assert classes == ["a_dog", "b_cat"]


def test_folder_loader_on_cpu_gives_no_pin_memory_warning(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", size=40, ext="jpg")
    make_folder(root / "val", size=40, ext="jpg")
    cfg = folder_cfg(tmp_path, root, name="imagenet_folder", image_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ld = build_loaders(cfg, torch.device("cpu"))
        ld.set_epoch(0)
        x, _ = next(iter(ld.train_batches()))
        assert x.shape == (4, 3, 32, 32) and sum(len(b[1]) for b in ld.eval) == 6
    assert not [str(w.message) for w in caught if "pin" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sum(len(b[1]) for b in build_eval_loader(cfg, torch.device("cpu"))) == 6
    assert not [str(w.message) for w in caught if "pin" in str(w.message)]


def test_eval_loader_reads_only_the_evaluation_split(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "test", n_per_class=2, size=8)
    cfg = folder_cfg(tmp_path, root, mean=[0.5] * 3, std=[0.25] * 3)
    ev = build_eval_loader(cfg, torch.device("cpu"))
    assert sum(len(y) for _, y in ev) == 4
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the test split alone was decoded
    with pytest.raises(FileNotFoundError, match=r"data\.root: .* has no training split: expected .*train/<class>/<image>"):
        build_loaders(cfg, torch.device("cpu"))
    # without data.mean/std the training statistics are needed: the error says how to do without
    with pytest.raises(FileNotFoundError, match=r"no training split.*data\.mean and data\.std"):
        build_eval_loader(folder_cfg(tmp_path, root), torch.device("cpu"))
    for name in ("image_folder_small", "imagenet_folder"):
        with pytest.raises(FileNotFoundError, match=r"data\.root: .*missing has no evaluation split: expected "
                                                    r".*missing/(test|val) or .*missing/(val|test) with one sub-folder"):
            build_eval_loader(folder_cfg(tmp_path, tmp_path / "missing", name=name), torch.device("cpu"))


def test_eval_loader_takes_training_statistics_from_the_cache(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", n_per_class=4, size=8)
    make_folder(root / "test", n_per_class=1, size=8)
    cfg = folder_cfg(tmp_path, root, image_size=8)
    trained = build_loaders(cfg, torch.device("cpu"))
    train_blob = image_folder_blob(tmp_path / "cache", root / "train")
    train_blob.unlink()  # were the training split decoded again, its images would be cached again
    ev = build_eval_loader(cfg, torch.device("cpu"))
    assert (ev.mean, ev.std) == (trained.eval.mean, trained.eval.std)
    assert not train_blob.exists()
    st = image_folder_stats(root / "train", cache_dir=tmp_path / "cache", image_size=8)
    assert st.mean == trained.train.mean and st.num_images == 8


def image_folder_blob(cache, split):
    """The cache file of ``split``'s decoded images (the one whose sidecar counts its images)."""
    import json

    n = sum(1 for _ in split.rglob("*.png"))
    for side in cache.glob("*.json"):
        if json.loads(side.read_text())["num_images"] == n:
            return side.with_suffix(".pt")
    raise AssertionError("no cache entry")


def test_eval_split_must_have_the_training_classes(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", classes=("a", "b", "c"), size=8)
    make_folder(root / "test", classes=("a", "c"), size=8)
    with pytest.raises(ValueError, match=r"class sub-folders of .*test differ.*missing in test: \['b'\]"):
        build_eval_loader(folder_cfg(tmp_path, root, mean=[0.5] * 3, std=[0.25] * 3), torch.device("cpu"))


def test_cli_eval_with_a_missing_data_folder_names_the_key(tmp_path, capsys):
    from helpers import write_config
    from nkd.cli import main
    from nkd.models import create_model

    ckpt = tmp_path / "w.pt"
    torch.save(create_model("resnet8", 2).state_dict(), ckpt)
    data = {"name": "image_folder_small", "root": str(tmp_path / "nowhere"), "cache_dir": str(tmp_path / "c")}
    cfg = write_config(tmp_path / "cfg.yaml", data=data, model={"name": "resnet8", "num_classes": 2})
    assert main(["eval", cfg, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "has no evaluation split" in err and "sub-folder per class" in err
    # only a test split and given statistics: scored
    make_folder(tmp_path / "nowhere" / "test", n_per_class=2, size=8)
    assert main(["eval", cfg, "--checkpoint", str(ckpt), "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]) == 0
    assert '"eval_samples": 4' in capsys.readouterr().out


def closed_port_url(filename):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: the connection is refused, no network involved
    return f"http://127.0.0.1:{port}/{filename}"


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_cifar_download_without_network_says_which_file_and_which_key(tmp_path, monkeypatch, name):
    import torchvision.datasets as tvd

    cls = {"cifar100": tvd.CIFAR100, "cifar10": tvd.CIFAR10}[name]
    monkeypatch.setattr(cls, "url", closed_port_url(cls.filename))  # torchvision's attribute, not ours
    with pytest.raises(FileNotFoundError) as err:
        load_cifar(tmp_path / "data", name, download=True)
    msg = str(err.value)
    assert "could not download" in msg and cls.tgz_md5 in msg and cls.filename in msg
    assert str(tmp_path / "data" / cls.base_folder) in msg and "set data.download=false after placing" in msg
    assert "pass download" not in msg


def test_cifar_missing_files_message_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_cifar(tmp_path, "cifar100")
    msg = str(err.value)
    assert "set data.download=true" in msg and "pass download=True" not in msg
    assert "cifar-100-python.tar.gz" in msg and str(tmp_path / "cifar-100-python" / "train") in msg


def test_mixup_cutmix_draw_only_from_the_given_generator():
    x, labels = torch.rand(16, 3, 8, 8), torch.arange(16) % 7
    for kw in ({"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}):
        mix = MixupCutmix(7, **kw)
        outs = []
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            before = torch.get_rng_state()
            outs.append(mix(x, labels, torch.Generator().manual_seed(42)))
            assert torch.equal(torch.get_rng_state(), before), kw  # the global RNG is left alone
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), kw
        other = mix(x, labels, torch.Generator().manual_seed(43))
        assert not torch.equal(other[1], outs[0][1]), kw  # the generator does decide
    with pytest.raises(TypeError, match="generator"):
        MixupCutmix(7, mixup_alpha=0.8)(x, labels, None)


@pytest.mark.parametrize(("n", "batch", "world", "steps"), [(20, 8, 1, 3), (16, 8, 1, 2), (21, 4, 2, 3), (17, 4, 2, 2),
                                                            (15, 2, 4, 2), (14, 2, 4, 1)])
def test_drop_last_false_keeps_the_partial_batch_when_every_process_gets_images(n, batch, world, steps):
    """data.drop_last=false (the CRD/mdistiller pipelines): ⌈N/B⌉ steps; under DDP the tail is kept
    only when each process's slice of it is non-empty."""
    per_rank = []
    for rank in range(world):
        dl = DeviceLoader(_marker_dataset(n), batch, train=True, mean=(0, 0, 0), std=(1, 1, 1), seed=0, rank=rank,
                          world_size=world, drop_last=False)
        assert len(dl) == steps
        per_rank.append([len(y) for _, y in dl])
    assert all(len(sizes) == steps and min(sizes) >= 1 for sizes in per_rank)
    full = n // (batch * world)
    assert sum(sum(sizes) for sizes in per_rank) == (n if steps > full else full * batch * world)
    dropped = DeviceLoader(_marker_dataset(n), batch, train=True, mean=(0, 0, 0), std=(1, 1, 1), world_size=world)
    assert len(dropped) == n // (batch * world)


def test_drop_last_is_a_config_key_that_reaches_the_loader():
    cfg = Config(data=DataConfig(name="synthetic", synthetic_samples=20, batch_size=8, drop_last=False),
                 model=ModelConfig(name="resnet8", num_classes=10))
    assert len(build_loaders(cfg, torch.device("cpu")).train) == 3
    cfg.data.drop_last = True
    assert len(build_loaders(cfg, torch.device("cpu")).train) == 2
