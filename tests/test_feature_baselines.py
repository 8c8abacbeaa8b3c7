"""Feature baselines (FitNet, AT, RKD, ReviewKD): each loss against its written-out reference in
float64 (values and gradients), gradcheck, the adapters' shapes, features by name, config errors,
and end-to-end / lockstep runs through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import write_config
from nkd.config import ConfigError, load_config
from nkd.engine import Trainer, train_together
from nkd.engine.checkpoint import load_checkpoint
from nkd.losses.feature import ABF, ConvRegressor, at_loss, hcl_loss, hint_loss, rkd_loss
from nkd.methods import Sample, Setup, Teacher, build_method
from nkd.models import create_model
from nkd.models.hooks import FeatureReader
from reference_losses import ref_abf, ref_at, ref_hcl, ref_rkd

D = torch.float64


def _maps(g, *shapes):
    return [torch.randn(*s, generator=g, dtype=D, requires_grad=True) for s in shapes]


def _close_with_grads(value, ref, inputs):
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(value, inputs, retain_graph=True)
    want = torch.autograd.grad(ref, inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_at_equals_the_reference_with_pooling_float64():
    g = torch.Generator().manual_seed(0)
    s = _maps(g, (3, 4, 8, 8), (3, 5, 4, 4), (3, 2, 2, 2))
    t = [x.detach() for x in _maps(g, (3, 6, 4, 4), (3, 5, 4, 4), (3, 7, 4, 4))]  # larger teacher map pooled too
    for p in (2.0, 3.0):
        _close_with_grads(at_loss(s, t, p), ref_at(s, t, p), s)


def test_rkd_equals_the_reference_float64():
    g = torch.Generator().manual_seed(1)
    (s,) = _maps(g, (5, 7))
    t = torch.randn(5, 9, generator=g, dtype=D)
    _close_with_grads(rkd_loss(s, t), ref_rkd(s, t), [s])
    _close_with_grads(rkd_loss(s, t, distance_weight=1.0, angle_weight=0.0), ref_rkd(s, t, 1.0, 0.0), [s])


def test_hcl_equals_the_reference_float64():
    g = torch.Generator().manual_seed(2)
    s = _maps(g, (2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 1, 1))
    t = [torch.randn(x.shape, generator=g, dtype=D) for x in s]
    _close_with_grads(hcl_loss(s, t), ref_hcl(s, t), s)


def test_hint_loss_and_gradcheck_of_every_feature_loss():
    g = torch.Generator().manual_seed(3)
    (s,) = _maps(g, (2, 3, 4, 4))
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    torch.testing.assert_close(hint_loss(s, t), ((s - t) ** 2).mean())
    (v,) = _maps(g, (4, 3))
    tv = torch.randn(4, 3, generator=g, dtype=D)
    assert torch.autograd.gradcheck(lambda a: hint_loss(a, t), (s,))
    assert torch.autograd.gradcheck(lambda a: at_loss([a], [t]), (s,))
    assert torch.autograd.gradcheck(lambda a: hcl_loss([a], [t]), (s,))
    assert torch.autograd.gradcheck(lambda a: rkd_loss(a, tv), (v,))


def test_abf_fusion_equals_the_written_out_reference_float64():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    deep, shallow = ABF(6, 4, 5, fuse=False).double(), ABF(3, 4, 2, fuse=True).double()
    xd = torch.randn(2, 6, 2, 2, generator=g, dtype=D, requires_grad=True)
    xs = torch.randn(2, 3, 4, 4, generator=g, dtype=D, requires_grad=True)
    out_d, res = deep(xd, None, 2)
    out_s, _ = shallow(xs, res, 8)  # resized 4 → 8 (nearest) to the teacher's side
    ref_d, ref_res = ref_abf(deep, xd, None, 2)
    ref_s, _ = ref_abf(shallow, xs, ref_res, 8)
    assert out_s.shape == (2, 2, 8, 8)
    loss, ref = out_d.pow(2).sum() + out_s.pow(3).sum(), ref_d.pow(2).sum() + ref_s.pow(3).sum()
    _close_with_grads(loss, ref, [xd, xs, *shallow.parameters()])


@pytest.mark.parametrize(("s_side", "t_side"), [(8, 4), (4, 8), (8, 6), (8, 8)])
def test_regressor_maps_the_student_map_to_the_teacher_shape(s_side, t_side):
    r = ConvRegressor((1, 3, s_side, s_side), (1, 5, t_side, t_side))
    assert r(torch.randn(2, 3, s_side, s_side)).shape == (2, 5, t_side, t_side)


def test_bad_feature_input_is_named():
    with pytest.raises(ValueError, match="ConvRegressor: no regressor from a 4×4 student map to a 6×6"):
        ConvRegressor((1, 3, 4, 4), (1, 5, 6, 6))
    with pytest.raises(ValueError, match="rkd_loss: relations need at least 2 samples"):
        rkd_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="at_loss: expected as many student as teacher maps"):
        at_loss([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError, match="hint_loss: the regressed student map must have the teacher's shape"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="same batch size"):
        hcl_loss([torch.randn(2, 3, 4, 4)], [torch.randn(3, 3, 4, 4)])


# ----------------------------------------------------------------------------- features by name
def test_feature_reader_builtin_names_equal_module_paths():
    m = create_model("resnet8", 10).eval()
    x = torch.randn(2, 3, 16, 16)
    logits, f = FeatureReader(m, ["@stage2", "layer2", "@pooled", "fc:input", "layer3.0.act:input"])(x)
    torch.testing.assert_close(f["@stage2"], f["layer2"])
    torch.testing.assert_close(f["@pooled"], f["fc:input"])
    torch.testing.assert_close(torch.relu(f["layer3.0.act:input"]), m.layer3[0](m.layer2(m.layer1(
        m.relu(m.bn1(m.conv1(x)))))))
    torch.testing.assert_close(logits, m(x))


def test_feature_reader_errors_name_the_reference():
    m = create_model("resnet8", 10)
    with pytest.raises(KeyError, match=r"no module 'layer2\.0\.conv3'.*did you mean"):
        FeatureReader(m, ["layer2.0.conv3"])
    with pytest.raises(ValueError, match="unknown built-in feature '@stage'"):
        FeatureReader(m, ["@stage"])
    with pytest.raises(ValueError, match="suffix after ':' must be one of"):
        FeatureReader(m, ["layer2:outputs"])
    with pytest.raises(IndexError, match=r"'@stage7': CifarResNet has 4 stages"):
        FeatureReader(m, ["@stage7"]).shapes((3, 16, 16))


def _method(name, params=None, student="resnet8", teacher="resnet20", side=16):
    t = create_model(teacher, 10)
    return build_method(name, params or {}, 10, create_model(student, 10), Setup((3, side, side), t)), Teacher(t)


def test_methods_take_their_published_layers_and_size_their_adapters():
    (m, tr), _ = _method("reviewkd", student="resnet8x4", teacher="resnet32x4")
    assert m.s_refs == ["@stage1", "@stage2", "@stage3", "@pooled"]
    assert m.t_refs == ["layer1.4.act:input", "layer2.4.act:input", "layer3.4.act:input", "@pooled"]  # pre-ReLU
    # mdistiller's res32x4 → res8x4 ReviewKD: in/out channels [64, 128, 256, 256], middle width 256
    assert [a.conv1[0].in_channels for a in tr.abfs][::-1] == [64, 128, 256, 256]
    assert [a.conv2[0].out_channels for a in tr.abfs][::-1] == [64, 128, 256, 256]
    assert {a.conv1[0].out_channels for a in tr.abfs} == {256}
    (m, tr), _ = _method("fitnet", student="resnet8", teacher="resnet32x4")
    assert tuple(tr.regressor.conv.weight.shape) == (128, 32, 1, 1)  # @stage2: 32 → 128 channels, same side
    (m, _), _ = _method("at")
    assert m.t_refs == m.s_refs == ["@stage1", "@stage2", "@stage3"]


def test_module_paths_give_the_same_loss_as_the_builtin_names():
    torch.manual_seed(0)
    (a, ta), teacher = _method("fitnet")
    torch.manual_seed(0)
    (b, tb), _ = _method("fitnet", {"student_layers": ["layer2"], "teacher_layers": ["layer2"]})
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    tb.load_state_dict(ta.state_dict())
    la = a.losses(ta(x), teacher(x, a.teacher_outputs), y, 0)
    lb = b.losses(tb(x), teacher(x, b.teacher_outputs), y, 0)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_feature_method_on_timm_and_torchvision_models_by_module_path():
    for name, layer in (("timm/resnet18", "layer3"), ("tv/resnet18", "layer3")):
        try:
            t = create_model(name, 10)
        except ImportError as e:
            pytest.skip(f"{name}: {e}")
        s = create_model("resnet8", 10)
        m, tr = build_method("at", {"student_layers": ["layer3"], "teacher_layers": [layer]}, 10, s,
                             Setup((3, 32, 32), t))
        x = torch.randn(2, 3, 32, 32)
        losses = m.losses(tr(x), Teacher(t)(x, m.teacher_outputs), torch.tensor([1, 2]), 0)
        assert torch.isfinite(losses["loss_at"]) and losses["loss_at"] > 0


def test_a_feature_method_without_its_setup_is_refused():
    with pytest.raises(ValueError, match="reads the teacher's features: build it with setup"):
        build_method("at", {}, 10, create_model("resnet8", 10))


# ----------------------------------------------------------------------------- through the engine
TEACHER = {"name": "resnet8", "num_classes": 10}


def _cfg(tmp: Path, name: str, method: dict, **extra) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    sections = {"schedule": {"name": "cosine", "epochs": 1}, **extra}
    return write_config(tmp / f"{name}.yaml", output_dir=str(tmp / name), teacher=TEACHER, method=method,
                        data={"name": "synthetic", "synthetic_samples": 32, "batch_size": 8, "image_size": 8},
                        **sections)


def test_config_errors_name_the_feature_keys(tmp_path):
    bad = [({"name": "fitnet", "params": {"student_layers": ["layer1", "layer2"]}},
            "method.params.student_layers: fitnet distils exactly 1 feature(s), got 2"),
           ({"name": "at", "params": {"student_layers": ["layer1"], "teacher_layers": ["layer1", "layer2"]}},
            "1 student features but 2 teacher features"),
           ({"name": "at", "params": {"student_layers": "layer1"}}, "method.params.student_layers"),
           ({"name": "reviewkd", "params": {"warmup_epochs": 5}}, "the ReviewKD ramp (5 epochs) is longer than the run"),
           ({"name": "rkd", "params": {"squared": 1}}, "method.params.squared")]
    for i, (method, message) in enumerate(bad):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(_cfg(tmp_path, f"bad{i}", method))


def test_unknown_module_path_fails_before_training_with_a_did_you_mean(tmp_path):
    cfg = load_config(_cfg(tmp_path, "path", {"name": "at", "params": {"student_layers": ["layer2.0.conv9"],
                                                                       "teacher_layers": ["layer2"]}}))
    with pytest.raises(KeyError, match=r"no module 'layer2\.0\.conv9'.*did you mean"):
        Trainer(cfg)
    assert not (tmp_path / "path" / "checkpoints" / "last.pt").exists()


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["trainable"]


def test_feature_students_share_one_teacher_forward_and_equal_their_separate_runs(tmp_path):
    methods = {"fitnet": {"name": "fitnet"}, "reviewkd": {"name": "reviewkd", "params": {"warmup_epochs": 1}},
               "kd": {"name": "kd"}, "at": {"name": "at", "params": {"student_layers": ["layer1", "layer3"],
                                                                     "teacher_layers": ["@stage1", "@stage3"]}}}
    for name, method in methods.items():
        Trainer(load_config(_cfg(tmp_path / "alone", name, method))).fit()
    group = [load_config(_cfg(tmp_path / "group", name, method)) for name, method in methods.items()]
    train_together(group)
    for name in methods:
        wa, wb = _weights(tmp_path / "alone" / name), _weights(tmp_path / "group" / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (name, [k for k in wa if not torch.equal(wa[k], wb[k])][:3])
    assert any(k.startswith("abfs.") for k in _weights(tmp_path / "group" / "reviewkd"))  # adapters are checkpointed
    assert any(k.startswith("regressor.") for k in _weights(tmp_path / "group" / "fitnet"))


def test_every_shipped_feature_config_builds_its_adapters_on_its_pair():
    """Each configs/cifar100/{fitnet,at,rkd,crd,reviewkd} pair builds (probe at 32×32) and gives finite losses."""
    root = Path(__file__).resolve().parents[1] / "configs" / "cifar100"
    paths = sorted(p for m in ("fitnet", "at", "rkd", "crd", "reviewkd") for p in (root / m).glob("*.yaml"))
    assert len(paths) == 45
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for path in paths:
        c = load_config(path)
        t = create_model(c.teacher.name, 100)
        params = {**c.method.params, **({"nce_k": 64} if c.method.name == "crd" else {})}  # a small bank for the test
        m, tr = build_method(c.method.name, params, 100, create_model(c.model.name, 100),
                             Setup((3, 32, 32), t, train_labels=torch.arange(500) % 100))
        extra = {"sample": Sample(torch.tensor([1, 2]), 0)} if m.needs_index else {}
        losses = m.losses(tr(x), Teacher(t)(x, m.teacher_outputs), y, 0, **extra)
        assert all(torch.isfinite(v) for v in losses.values()), path


# ----------------------------------------------------------------------------- CRD
def test_crd_memory_and_nce_follow_the_official_step_for_three_steps_float64():
    from nkd.losses.feature import CRDMemory, crd_nce_loss
    from reference_losses import RefCRD

    torch.manual_seed(0)
    mem = CRDMemory(4, 10, temperature=0.5, momentum=0.3).double()
    ref = RefCRD(mem.memory_s, mem.memory_t, 0.5, 0.3)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        v_s = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=D), dim=1).requires_grad_()
        v_t = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=D), dim=1).requires_grad_()
        index = torch.randperm(10, generator=g)[:3]
        cidx = torch.cat([index[:, None], torch.randint(0, 10, (3, 5), generator=g)], 1)
        h_s, h_t = mem.scores(v_s, v_t, cidx)
        loss = crd_nce_loss(h_s, 10) + crd_nce_loss(h_t, 10)
        want = ref.step(v_s, v_t, index, cidx)
        _close_with_grads(loss, want, [v_s, v_t])
        mem.update(v_s, v_t, index)
        torch.testing.assert_close(mem.memory_s, ref.ms, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mem.memory_t, ref.mt, rtol=1e-12, atol=1e-14)
        assert mem.z.tolist() == pytest.approx(list(ref.z), rel=1e-12)


def test_contrast_sampler_draws_the_sample_then_other_classes():
    from nkd.data.contrast import ContrastSampler

    labels = torch.arange(40) % 4
    s = ContrastSampler(labels, k=12)
    idx = torch.tensor([0, 5, 38])
    a, b = s.draw(idx, seed=7), s.draw(idx, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, s.draw(idx, seed=8))  # a function of the seed only
    assert torch.equal(a[:, 0], idx)
    for row, i in zip(a, idx):
        assert (labels[row[1:]] != labels[i]).all() and len(set(row[1:].tolist())) == 12  # without replacement
    many = ContrastSampler(labels, k=50).draw(idx, seed=0)  # more than the 30 negatives: with replacement
    assert many.shape == (3, 51) and (labels[many[:, 1:]] != labels[idx][:, None]).all()
    relax = ContrastSampler(labels, k=3, mode="relax").draw(idx, seed=0)
    assert (labels[relax[:, 0]] == labels[idx]).all()
    with pytest.raises(ValueError, match="at least two classes"):
        ContrastSampler(torch.zeros(5, dtype=torch.long), k=2)


def test_crd_trains_in_lockstep_and_resumes_after_a_kill_bitwise(tmp_path):
    """The memory banks and their constants are checkpointed: a run killed (SIGKILL) inside its second
    epoch and resumed ends on the weights and banks of the uninterrupted run, and so does the CRD
    student of a lockstep group (its negatives are drawn from the step's seed, not a shared stream)."""
    import signal

    import procs

    crd = {"name": "crd", "params": {"nce_k": 8, "feat_dim": 16}}
    two = {"schedule": {"name": "cosine", "epochs": 2}, "train": {"progress": False, "tensorboard": False,
                                                                  "checkpoint_every_steps": 2}}
    Trainer(load_config(_cfg(tmp_path / "straight", "crd", crd, **two))).fit()
    wa = _weights(tmp_path / "straight" / "crd")
    assert {"memory.memory_s", "memory.memory_t", "memory.z", "embed_t.linear.weight"} <= wa.keys()
    assert float(wa["memory.z"][0]) > 0
    killed = _cfg(tmp_path / "killed", "crd", crd, **two)
    r = procs.nkd("train", killed, env=procs.nkd_env(NKD_FAULT_KILL_STEP="6"))  # epoch 2, after its step-2 save
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert procs.nkd("train", killed, "--resume").returncode == 0
    group = [load_config(_cfg(tmp_path / "group", n, m, **two)) for n, m in (("kd", {"name": "kd"}), ("crd", crd))]
    train_together(group)
    for other in (tmp_path / "killed" / "crd", tmp_path / "group" / "crd"):
        wb = _weights(other)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (other, [k for k in wa if not torch.equal(wa[k], wb[k])][:3])


def test_crd_config_problems(tmp_path):
    for data, message in (({"mixup": 0.2}, "cannot train on mixed images"),):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path / "c.yaml", teacher=TEACHER, method={"name": "crd"},
                                     data={"name": "synthetic", "image_size": 8, **data}))
