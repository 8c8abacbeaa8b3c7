"""Documentation checks: every public loss documents itself, and nothing cites developer-only files.

(a) Every public function / ``nn.Module`` in ``nkd.losses.__all__`` has its own docstring that
    names each of its parameters and does not defer to another docstring; every module defines
    ``forward`` with its own docstring naming ``forward``'s parameters.
(b) The repository's own text (src/, docs/, configs/, README.md) never cites the developers'
    private maths notes (``SPEC.md``) or paths outside the repository (``../shared``).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from torch import nn

import nkd.losses as L

ROOT = Path(__file__).resolve().parents[1]
DEFERRING = re.compile(r"see (the )?module docstring|module docstring has", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".rst", ".toml", ".cfg"}


def _public_objects() -> list[tuple[str, object]]:
    out = []
    for name in L.__all__:
        obj = getattr(L, name)
        if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module)):
            out.append((name, obj))
    return out


PUBLIC = _public_objects()
MODULES = [(n, o) for n, o in PUBLIC if inspect.isclass(o)]


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _missing_names(doc: str, names: list[str]) -> list[str]:
    return [n for n in names if not re.search(rf"\b{re.escape(n)}\b", doc)]


def test_public_objects_found():
    # the checks below must see the losses, or they would pass vacuously
    names = {n for n, _ in PUBLIC}
    assert {"nkd_loss", "uskd_loss", "kd_loss", "dkd_loss", "NKDLoss", "USKDLoss"} <= names, names


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_docstring_names_every_parameter(name, obj):
    doc = obj.__doc__
    assert doc and doc.strip(), f"nkd.losses.{name} has no docstring"
    assert not DEFERRING.search(doc), f"nkd.losses.{name}'s docstring defers to another docstring instead of stating its formula"
    params = _params(obj.__init__ if inspect.isclass(obj) else obj)
    missing = _missing_names(doc, params)
    assert not missing, f"nkd.losses.{name}'s docstring does not mention its parameter(s) {missing}"


@pytest.mark.parametrize("name,cls", MODULES, ids=[n for n, _ in MODULES])
def test_forward_has_own_docstring(name, cls):
    fwd = cls.__dict__.get("forward")
    assert fwd is not None, f"nkd.losses.{name} does not define forward itself"
    doc = fwd.__doc__
    assert doc and doc.strip(), f"nkd.losses.{name}.forward has no docstring of its own (help() shows torch's generic text)"
    assert not DEFERRING.search(doc), f"nkd.losses.{name}.forward's docstring defers to another docstring"
    missing = _missing_names(doc, _params(fwd))
    assert not missing, f"nkd.losses.{name}.forward's docstring does not mention {missing}"


# ---------------------------------------------------------------- (b) no developer-only citations
SPEC_FILE = re.compile(r"SPEC\.md|\.\./shared")
SPEC_WORD = re.compile(r"\bSPEC\b")  # the bare word; TORCH_SPEC does not match (no word boundary)


def _text_files(*rels: str) -> list[Path]:
    files = []
    for rel in rels:
        p = ROOT / rel
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    return files


def _offenders(files: list[Path], pattern: re.Pattern) -> list[str]:
    bad = []
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    return bad


def test_docs_methods_exists():
    assert (ROOT / "docs" / "methods.md").is_file(), "docs/methods.md is missing"


@pytest.mark.parametrize("area", ["src", "docs"])
def test_no_spec_md_or_shared_path(area):
    files = _text_files(area)
    assert files, f"no text files found under {area}/"
    bad = _offenders(files, SPEC_FILE)
    assert not bad, f"{area}/ cites SPEC.md or ../shared:\n" + "\n".join(bad)


@pytest.mark.parametrize("area", ["src/nkd/losses", "docs"])
def test_no_bare_spec_word(area):
    bad = _offenders(_text_files(area), SPEC_WORD)
    assert not bad, f"{area}/ refers to SPEC (cite docs/methods.md instead):\n" + "\n".join(bad)


@pytest.mark.parametrize("area", ["README.md", "configs"])
def test_no_spec_in_readme_and_configs(area):
    files = _text_files(area)
    assert files, f"no text files found at {area}"
    bad = _offenders(files, SPEC_FILE) + _offenders(files, SPEC_WORD)
    assert not bad, f"{area} cites SPEC:\n" + "\n".join(sorted(set(bad))[:20])


def test_no_bare_spec_word_in_rest_of_src():
    bad = _offenders(_text_files("src"), SPEC_WORD)
    assert not bad, "src/ refers to SPEC (cite docs/methods.md instead):\n" + "\n".join(bad)
