"""nkd's feature baselines against mdistiller's own code on the same fixed tensors (float64).

mdistiller is not on PyPI: point ``--mdistiller`` at a checkout or a git directory of
``megvii-research/mdistiller`` (the figures in RESULTS.md: commit a08d46f). Its distiller files
are unpacked into a temporary folder outside this repository and imported from there; the one
patch is at run time, not in its files: ``AliasMethod.cuda`` is made a no-op so CRD's memory builds
on a CPU. Compared: AT, RKD, ReviewKD's HCL and ABF fusion, FitNet's regressor + hint, CRD's
memory + NCE over three steps (scores, loss, gradients, banks), each as the largest relative
difference ``max|a − b| / max|b|`` of values and gradients. (mdistiller keeps CRD's temperature in a
float32 buffer, so at τ = 0.07 its τ is 0.07000000030 and CRD differs at ~5e-9; at a τ that float32
holds exactly, e.g. 0.5, the difference is ~1e-16.)

    python benchmarks/peers_reference.py --mdistiller /path/to/mdistiller[.git]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import _mdistiller  # noqa: E402
from nkd.losses.feature import ABF, ConvRegressor, CRDMemory, at_loss, crd_nce_loss, hcl_loss, hint_loss, rkd_loss  # noqa: E402

D = torch.float64
NAMES = ("_common", "AT", "RKD", "ReviewKD", "FitNet", "CRD")


def load_distillers(source: Path, into: Path):
    """mdistiller's distiller modules, from its package unpacked under ``into``."""
    _mdistiller.unpack(source, into)
    return {n: _mdistiller.crd_on_cpu() if n == "CRD" else importlib.import_module(f"mdistiller.distillers.{n}")
            for n in NAMES}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def compare(ours, theirs, inputs) -> dict[str, float]:
    ga = torch.autograd.grad(ours, inputs, retain_graph=True)
    gb = torch.autograd.grad(theirs, inputs)
    return {"value": rel(ours.detach(), theirs.detach()), "grad": max(rel(a, b) for a, b in zip(ga, gb))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mdistiller", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        m = load_distillers(args.mdistiller, Path(tmp))
        g = torch.Generator().manual_seed(0)

        def rnd(*shape, grad=True):
            return torch.randn(*shape, generator=g, dtype=D, requires_grad=grad)

        out = {}
        s = [rnd(4, 16, 32, 32), rnd(4, 32, 16, 16), rnd(4, 64, 8, 8)]
        t = [rnd(4, 64, 32, 32, grad=False), rnd(4, 128, 16, 16, grad=False), rnd(4, 256, 4, 4, grad=False)]
        out["at"] = compare(at_loss(s, t, 2.0), m["AT"].at_loss(s, t, 2), s)
        e, te = rnd(8, 64), rnd(8, 256, grad=False)
        out["rkd"] = compare(rkd_loss(e, te), m["RKD"].rkd_loss(e, te), [e])
        hs = [rnd(4, 64, 32, 32), rnd(4, 128, 16, 16), rnd(4, 256, 8, 8), rnd(4, 256, 1, 1)]
        ht = [torch.randn(x.shape, generator=g, dtype=D) for x in hs]
        out["hcl"] = compare(hcl_loss(hs, ht), m["ReviewKD"].hcl_loss(hs, ht), hs)

        # ReviewKD's fusion: the same weights in both ABF modules, deepest level first
        x = [rnd(4, 256, 1, 1), rnd(4, 256, 8, 8), rnd(4, 128, 16, 16), rnd(4, 64, 32, 32)]
        out_ch, sides = [256, 256, 128, 64], [1, 8, 16, 32]
        ours_l, theirs_l = [], []
        for i, (xi, c) in enumerate(zip(x, out_ch)):
            theirs_abf = m["ReviewKD"].ABF(xi.shape[1], 256, c, i > 0).double()
            ours_abf = ABF(xi.shape[1], 256, c, fuse=i > 0).double()
            ours_abf.load_state_dict(theirs_abf.state_dict())
            ours_l.append(ours_abf)
            theirs_l.append(theirs_abf)
        y_o, r_o = ours_l[0](x[0], None, sides[0])
        y_t, r_t = theirs_l[0](x[0], out_shape=sides[0])
        res_o, res_t = [y_o], [y_t]
        for xi, ao, at_, side in zip(x[1:], ours_l[1:], theirs_l[1:], sides[1:]):
            y_o, r_o = ao(xi, r_o, side)
            y_t, r_t = at_(xi, r_t, side, side)
            res_o.append(y_o)
            res_t.append(y_t)
        out["abf_fusion"] = compare(sum(v.pow(2).sum() for v in res_o), sum(v.pow(2).sum() for v in res_t), x)

        fs, ft = rnd(4, 32, 16, 16), rnd(4, 128, 16, 16, grad=False)
        reg_t = m["_common"].ConvReg(fs.shape, ft.shape).double()
        reg_o = ConvRegressor(fs.shape, ft.shape).double()
        reg_o.load_state_dict(reg_t.state_dict())
        out["fitnet"] = compare(hint_loss(reg_o(fs), ft), torch.nn.functional.mse_loss(reg_t(fs), ft), [fs])

        # CRD: memory + NCE for three steps, from the same initial banks
        n, d, k = 50, 16, 12
        torch.manual_seed(0)
        theirs = m["CRD"].ContrastMemory(d, n, k, 0.07, 0.5).double()
        ours = CRDMemory(d, n, 0.07, 0.5).double()
        ours.memory_s.copy_(theirs.memory_v1)
        ours.memory_t.copy_(theirs.memory_v2)
        crit_s, crit_t = m["CRD"].ContrastLoss(n), m["CRD"].ContrastLoss(n)
        crd = {"value": 0.0, "grad": 0.0, "banks": 0.0}
        for _ in range(3):
            v_s = torch.nn.functional.normalize(rnd(6, d, grad=False), dim=1).requires_grad_()
            v_t = torch.nn.functional.normalize(rnd(6, d, grad=False), dim=1).requires_grad_()
            index = torch.randperm(n, generator=g)[:6]
            cidx = torch.cat([index[:, None], torch.randint(0, n, (6, k), generator=g)], 1)
            h_s, h_t = ours.scores(v_s, v_t, cidx)
            mine = crd_nce_loss(h_s, n) + crd_nce_loss(h_t, n)
            o_s, o_t = theirs(v_s, v_t, index, cidx)  # updates its banks inside
            step = compare(mine, crit_s(o_s).squeeze() + crit_t(o_t).squeeze(), [v_s, v_t])
            ours.update(v_s, v_t, index)
            banks = max(rel(ours.memory_s, theirs.memory_v1), rel(ours.memory_t, theirs.memory_v2))
            crd = {"value": max(crd["value"], step["value"]), "grad": max(crd["grad"], step["grad"]),
                   "banks": max(crd["banks"], banks)}
        out["crd_3_steps"] = crd
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
