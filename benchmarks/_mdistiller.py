"""mdistiller (megvii-research/mdistiller, not on PyPI) for the peer benchmarks: its ``mdistiller``
package and ``configs`` folder put, unmodified, into a temporary folder outside this repository and
onto ``sys.path``. ``source`` is a checkout or a git directory (read at ``HEAD``)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


def unpack(source: Path, into: Path) -> Path:
    """``into/mdistiller`` and ``into/configs`` from ``source``; ``into`` goes first on ``sys.path``."""
    if (source / "mdistiller").is_dir():
        for name in ("mdistiller", "configs"):
            shutil.copytree(source / name, into / name)
    else:
        tar = subprocess.run(["git", "--git-dir", str(source), "archive", "HEAD", "mdistiller", "configs"],
                             capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(into, filter="data")
    sys.path.insert(0, str(into))
    return into


def crd_on_cpu():
    """mdistiller's ``distillers/CRD.py`` module with the one run-time patch the peer scripts apply:
    ``AliasMethod.cuda`` is a no-op, so CRD's negative sampler builds on a CPU (its files stay as they are)."""
    import importlib

    module = importlib.import_module("mdistiller.distillers.CRD")  # the package's `CRD` attribute is the class
    module.AliasMethod.cuda = lambda self: None
    return module


def commit(source: Path) -> str:
    """The short commit of ``source`` (a checkout or a git directory)."""
    args = ["git", "-C", str(source)] if (source / "mdistiller").is_dir() else ["git", "--git-dir", str(source)]
    return subprocess.run([*args, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
