"""``nkd lm cache`` / ``nkd lm train``: config validation, cache → train, run directory, bitwise resume, report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from lm_tiny import FILES, tiny_llama, tiny_tokenizer  # noqa: E402
from nkd.cli import main  # noqa: E402
from nkd.lm.recipe import run_train  # noqa: E402
from nkd.report import write_report  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    tiny_tokenizer(300).save(str(d / "tokenizer.json"))
    (d / "train").mkdir()
    (d / "val").mkdir()
    for p in FILES[:3]:
        shutil.copy(p, d / "train" / p.name)
    shutil.copy(FILES[3], d / "val" / FILES[3].name)
    tiny_llama(vocab=300).save_pretrained(d / "teacher")
    return d


def _config(d, name, **over):
    cfg = {"output_dir": f"runs/{name}", "seed": 0, "tokenizer": "tokenizer.json",
           "corpus": {"train": ["train"], "val": ["val"], "block_length": 32, "eot_token": "<|endoftext|>"},
           "teacher": {"pretrained": "teacher"}, "student": {"config": {"hidden_size": 16, "num_hidden_layers": 1}},
           "cache": {"path": "cache", "top_k": 8, "batch_size": 8},
           "method": {"name": "nkd"}, "optim": {"lr": 0.003}, "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "log_every": 1}}
    for k, v in over.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_cache_then_train_writes_a_run_that_nkd_report_reads(workdir, capsys, tmp_path):
    assert main(["lm", "cache", str(_config(workdir, "a"))]) == 0
    assert "bytes per token" in capsys.readouterr().out
    assert main(["lm", "train", str(_config(workdir, "a"))]) == 0
    run = workdir / "runs" / "a"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [3, 6] and all(r["perplexity"] > 1 for r in rows)
    s = json.loads((run / "summary.json").read_text())
    assert s["teacher"] == "cache" and s["data"]["top_k"] == 8 and s["last_top1"] == rows[-1]["top1"]
    assert "step 6/6" in (run / "train.log").read_text() and not (run / ".nkd.lock").exists()
    write_report([run], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "nkd" in md and "| perplexity |" in md.replace(" | Δ perplexity (paired)", "")  # an LM run has a perplexity column
    assert f"{s['perplexity']:.2f}" in md
    # a second fresh start in the same run directory is refused
    assert main(["lm", "train", str(_config(workdir, "a"))]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_after_an_interruption_is_bitwise(workdir):
    cfg = _config(workdir, "full", method={"name": "kd"})
    if not (workdir / "cache").exists():
        assert main(["lm", "cache", str(cfg)]) == 0
    run_train(str(cfg), log=lambda m: None)
    cfg2 = _config(workdir, "cut", method={"name": "kd"})

    def stop(msg):
        if msg.startswith("step 5/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(str(cfg2), log=stop)
    assert torch.load(workdir / "runs/cut/checkpoints/last.pt", weights_only=False)["step"] == 3
    assert main(["lm", "train", str(cfg2), "--resume"]) == 0
    a = torch.load(workdir / "runs/full/checkpoints/last.pt", weights_only=False)
    b = torch.load(workdir / "runs/cut/checkpoints/last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["perplexity"] for r in a["history"]] == [r["perplexity"] for r in b["history"]]
    lines = (workdir / "runs/cut/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["global_step"] for x in lines] == [3, 6]


def test_bad_config_lists_every_problem_and_writes_nothing(workdir, capsys):
    cfg = _config(workdir, "bad", tokenizer="nope.json", corpus={"train": ["missing"], "block_length": 1},
                  method={"name": "dkd", "temperature": -1}, cache={"top_k": 0}, train={"steps": 0}, colour="blue")
    assert main(["lm", "train", str(cfg)]) == 2
    err = capsys.readouterr().err
    for what in ("tokenizer", "corpus.train: not found: missing", "corpus.block_length", "method.name", "method.temperature",
                 "cache.top_k", "train.steps", "colour: unknown key"):
        assert what in err, what
    assert not (workdir / "runs" / "bad").exists()


def test_train_without_teacher_or_cache_and_other_refusals(workdir, capsys):
    assert main(["lm", "train", str(_config(workdir, "nt", teacher=None, cache=None))]) == 2
    assert "teacher or cache" in capsys.readouterr().err
    assert main(["lm", "cache", str(_config(workdir, "nc", cache=None))]) == 2
    assert "cache.path" in capsys.readouterr().err
    assert main(["lm", "train", str(_config(workdir, "k1", cache={"top_k": 1}))]) == 2
    assert "NKD needs top_k >= 2" in capsys.readouterr().err
    # a tokenizer whose vocabulary is not the model's
    tiny_tokenizer(280).save(str(workdir / "tok280.json"))
    assert main(["lm", "cache", str(_config(workdir, "v", tokenizer="tok280.json", cache={"path": "cache280"}))]) == 2
    assert "vocabulary of 280" in capsys.readouterr().err
    assert not (workdir / "cache280").exists()
    # a cache written from other blocks than the config's corpus
    if not (workdir / "cache").exists():
        assert main(["lm", "cache", str(_config(workdir, "a"))]) == 0
    assert main(["lm", "train", str(_config(workdir, "ob", corpus={"train": ["val"]}))]) == 2
    assert "input_ids: not the blocks" in capsys.readouterr().err
    assert not (workdir / "runs" / "ob").exists()


def test_jsd_trains_from_the_recipe_with_its_beta(workdir):
    """method.name: jsd takes its β (and temperature) from the YAML; β changes what is trained."""
    finals = {}
    for beta in (0.0, 1.0):
        cfg = _config(workdir, f"jsd{beta}", method={"name": "jsd", "beta": beta, "topk_rest": "uniform"}, cache=None,
                      train={"steps": 2, "eval_every": 2})
        assert main(["lm", "train", str(cfg)]) == 0
        rows = [json.loads(x) for x in (workdir / "runs" / f"jsd{beta}" / "metrics.jsonl").read_text().splitlines()]
        finals[beta] = rows[-1]["perplexity"]
    assert finals[0.0] != finals[1.0]
