"""The front door tells the truth: every README code block runs (Python blocks execute in a fresh
process; every ``nkd``/``torchrun`` command line parses, and the configs it names exist and
validate), the generated config reference is up to date, and every doc link resolves."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

import procs
from nkd.cli import build_parser
from nkd.config import config_reference, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
PYTHON = [b for lang, b in BLOCKS if lang == "python"]
BASH = [b for lang, b in BLOCKS if lang == "bash"]


def test_readme_has_code_blocks():
    assert len(PYTHON) >= 2 and len(BASH) >= 2


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_every_python_block_runs(code, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    res = procs.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True)
    assert res.returncode == 0, f"README block failed:\n{code}\n{res.stderr[-3000:]}"


def _commands() -> list[list[str]]:
    cmds = []
    for block in BASH:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split("  #")[0]).strip()  # [optional] parts are shown, not typed
            if line.startswith(("nkd ", "torchrun ")):
                cmds.append(shlex.split(line))
    return cmds


COMMANDS = _commands()


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_command_line_parses_and_its_configs_validate(argv):
    if argv[0] == "torchrun":  # torchrun's own options, then `-m nkd <command>`
        argv = argv[argv.index("nkd") + 1:]
    else:
        argv = argv[1:]
    argv = [a.replace("CONFIG", "configs/cifar100/nkd/resnet32x4_resnet8x4.yaml") for a in argv]
    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in x for x in extra), extra
    for item in [getattr(args, "config", None), *getattr(args, "items", [])]:
        if item and item.endswith(".yaml"):
            overrides = [x for x in [*getattr(args, "overrides", []), *extra, *getattr(args, "items", [])] if "=" in x]
            load_config(ROOT / item, overrides)


def test_config_reference_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: python -m nkd.config > docs/config.md"


def test_doc_links_resolve():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
