"""One spec per loss: every derived form (function, module, fused, method) treats the call the
same way; adding a loss is one spec + one registry line (the worked example in docs/methods.md runs
here, end to end through the trainer)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nkd.losses import LOSS_SPECS, LOSSES, dkd_loss
from nkd.losses.chunked import DenseTeacher, LinearTeacher, TopKTeacher, fused_linear_loss
from nkd.losses.dkd import DKD
from nkd.methods import METHODS
from nkd.methods.base import methods_table

ROOT = Path(__file__).resolve().parents[1]


def _call(name: str, **kw):
    spec = LOSS_SPECS[name]
    z = torch.randn(4, 5)
    tensors = [z] + [torch.randn(4, 5) for _ in spec.inputs[1:]]
    return LOSSES[name](*tensors, torch.randint(0, 5, (4,)), **kw)


@pytest.mark.parametrize("name", list(LOSS_SPECS))
def test_no_loss_accepts_a_bool_ignore_index(name):
    # True == 1 would silently drop every class-1 row
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        _call(name, ignore_index=True)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        _call(name, ignore_index=1.0)
    module = LOSS_SPECS[name].module
    if module is not None and "ignore_index" in inspect.signature(module.__init__).parameters:
        with pytest.raises(TypeError, match="ignore_index"):
            module(**({"in_features": 3, "num_classes": 5} if name == "uskd" else {}), ignore_index=True)


@pytest.mark.parametrize("name", list(LOSS_SPECS))
def test_every_hyper_parameter_is_checked_by_the_spec_function_module_and_method(name):
    spec = LOSS_SPECS[name]
    for f in spec.hyper_parameters():
        bad = "nope" if isinstance(f.default, str) else float("nan")
        with pytest.raises(ValueError, match=f.name):
            spec(**{f.name: bad})
        with pytest.raises(ValueError, match=f.name):
            _call(name, **{f.name: bad})
        if name in METHODS:
            with pytest.raises(ValueError, match=f.name):
                METHODS[name].Params(**{f.name: bad})


def test_reductions_are_checked_once_for_every_loss():
    for name in LOSS_SPECS:
        with pytest.raises(ValueError, match="reduction must be one of"):
            _call(name, reduction="avg")
    with pytest.raises(ValueError, match="no per-row loss"):
        _call("dist", reduction="none")


def test_method_params_are_the_specs_with_the_methods_weights():
    from nkd.methods.base import LossMethod

    others = {name for name, cls in METHODS.items() if not issubclass(cls, LossMethod)}
    assert others == {"ce", "fitnet", "at", "rkd", "reviewkd", "crd"}  # no loss spec: CE and the feature methods
    for name, cls in METHODS.items():
        if name in others:
            continue
        spec = LOSS_SPECS[{"zipf_ls": "zipf_ls"}.get(name, name)]
        assert issubclass(cls.Params, spec), name
        own = {f.name for f in spec.hyper_parameters()}
        assert own <= {f.name for f in dataclasses.fields(cls.Params)}, name


def test_fused_form_of_a_spec_without_analytic_gradient_equals_the_dense_loss_float64():
    g = torch.Generator().manual_seed(0)
    n, h, ht, v = 12, 6, 5, 9
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(n, ht, generator=g, dtype=torch.float64), torch.randn(v, ht, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    target[3] = -100
    spec = DKD(alpha=1.0, beta=2.0, temperature=2.0)
    for teacher in (LinearTeacher(th, tw), DenseTeacher(th @ tw.T)):
        fused = fused_linear_loss(spec, hidden, head, teacher, target, ce_weight=0.5, chunk_size=5)
        z = hidden @ head.T
        keep = target != -100
        ref = dkd_loss(z, th @ tw.T, target, alpha=1.0, beta=2.0, temperature=2.0) + 0.5 * torch.nn.functional.cross_entropy(
            z[keep], target[keep])
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
        gf = torch.autograd.grad(fused, (hidden, head))
        gr = torch.autograd.grad(ref, (hidden, head))
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda hh, ww: fused_linear_loss(spec, hh, ww, LinearTeacher(th, tw), target, chunk_size=4, reduction="sum"),
        (hidden, head))
    # a top-k teacher with k = V is the dense teacher
    lp = torch.log_softmax(th @ tw.T, -1)
    ids = torch.arange(v).expand(n, v)
    torch.testing.assert_close(fused_linear_loss(spec, hidden, head, TopKTeacher(ids, lp), target),
                               fused_linear_loss(spec, hidden, head, DenseTeacher(th @ tw.T), target))


def test_batch_coupled_losses_cannot_be_chunked():
    for name in ("dist", "uskd"):
        spec = LOSS_SPECS[name]()
        with pytest.raises(ValueError, match="couples the rows"):
            fused_linear_loss(spec, torch.randn(4, 3), torch.randn(5, 3), DenseTeacher(torch.randn(4, 5)),
                              torch.zeros(4, dtype=torch.long))


def test_docs_method_table_is_generated_from_the_registries():
    doc = (ROOT / "docs" / "methods.md").read_text()
    m = re.search(r"<!-- generated by `python -m nkd.methods`: do not edit by hand -->\n(.*?)<!-- end of generated table -->",
                  doc, re.S)
    assert m, "docs/methods.md lost its generated method table"
    assert m.group(1) == methods_table(), "docs/methods.md is stale: python -m nkd.methods"
    for name in METHODS:
        assert f"| `{name}` |" in m.group(1)


def _adding_a_loss_block() -> str:
    doc = (ROOT / "docs" / "methods.md").read_text()
    section = doc[doc.index("## Adding a loss"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_adding_a_loss_worked_example_runs_and_trains(tmp_path):
    # the docs' block, then the derived method through the real trainer (a fresh process: registries are global)
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_config

    cfg = write_config(tmp_path / "rkd.yaml", output_dir=str(tmp_path / "run"),
                       teacher={"name": "resnet8", "num_classes": 10},
                       method={"name": "reverse_kd", "params": {"temperature": 2.0}},
                       data={"synthetic_samples": 32, "batch_size": 8, "image_size": 8},
                       schedule={"name": "constant", "epochs": 1})
    code = _adding_a_loss_block() + textwrap.dedent(f"""
        import json
        from nkd.config import load_config
        from nkd.engine import Trainer
        from nkd.losses import LOSSES
        from nkd.methods import METHODS
        summary = Trainer(load_config({cfg!r})).fit()
        assert "reverse_kd" in LOSSES and "reverse_kd" in METHODS
        rows = [json.loads(x) for x in open({str(tmp_path / "run" / "metrics.jsonl")!r})]
        assert rows and "loss_reverse_kd" in rows[-1], rows[-1]
        print("OK", summary["method"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=None,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK reverse_kd" in out.stdout


def test_fused_dkd_public_forms_are_derived_from_the_spec():
    from nkd.losses import FusedLinearDKDLoss, fused_linear_dkd_loss

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 4, generator=g, dtype=torch.float64)
    head = torch.randn(7, 4, generator=g, dtype=torch.float64)
    tl = torch.randn(10, 7, generator=g, dtype=torch.float64)
    t = torch.randint(0, 7, (10,), generator=g)
    ref = dkd_loss(hidden @ head.T, tl, t, beta=2.0)
    torch.testing.assert_close(fused_linear_dkd_loss(hidden, head, target=t, teacher_logits=tl, beta=2.0, chunk_size=3), ref)
    torch.testing.assert_close(FusedLinearDKDLoss(beta=2.0)(hidden, head, target=t, teacher_logits=tl), ref)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearDKDLoss(beta=-1.0)
    assert "beta" in inspect.signature(fused_linear_dkd_loss).parameters
