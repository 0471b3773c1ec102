"""The snippets of the README and of the manual (docs/), run exactly as written, on their own
(they define their models)."""

import re

import pytest
import torch
from helpers import README, readme_snippets





def test_functional_snippet_trains_the_student_and_never_the_teacher():
    code = readme_snippets()["functional"]
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scope["student"].parameters())
    assert all(p.grad is None for p in scope["teacher"].parameters())


def test_module_snippet_is_six_lines_and_lowers_the_loss():
    blocks = readme_snippets()
    assert len(blocks["module"].strip().splitlines()) == 6
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(blocks["functional"], str(README), "exec"), scope)
    before = scope["jm"].TransferObjective(scope["student"], scope["teacher"], terms=[
        scope["jm"].CrossEntropyLoss(), scope["jm"].KDLoss(1.0, temperature=8),
        scope["jm"].JacobianMatchingLoss(10.0)])(scope["x"], scope["y"])[1].item()
    exec(compile(blocks["module"], str(README), "exec"), scope)
    assert set(scope["terms"]) == {"ce", "kd", "jm"}
    assert scope["objective"](scope["x"], scope["y"])[1].item() < before
    assert all(p.grad is None for p in scope["teacher"].parameters())


def test_lightning_snippet_trains_a_student_and_logs_every_term(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippets()["lightning"], str(README), "exec"), scope)
    logged = scope["module"].trainer.logged_metrics
    assert {"train/ce_epoch", "train/kd_epoch", "train/jm_epoch", "train/loss_epoch"} <= set(logged)
    assert all(p.grad is None for p in scope["teacher"].parameters()) and not scope["teacher"].training


def test_transformers_snippet_distils_a_vit_with_its_default_attention(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippets()["transformers"], str(README), "exec"), scope)
    assert scope["student"].config._attn_implementation == "sdpa"
    logs = scope["trainer"].state.log_history
    assert {"loss", "ce", "kd", "jm"} <= set(logs[0]) and logs[0]["jm"] > 0
    assert not any(p.requires_grad for p in scope["teacher"].parameters()) and not scope["teacher"].training


@pytest.mark.slow
def test_recipe_snippet_trains_a_few_sample_student_to_its_own_end(tmp_path, monkeypatch):
    from jacmatch.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["train-teacher", "--dataset", "digits", "--model", "small_cnn_8", "--out", "t",
                 "--set", "optim.epochs=30", "--set", "progress=false"]) == 0
    scope: dict = {}
    exec(compile(readme_snippets()["recipe"], str(README), "exec"), scope)
    results = scope["results"]
    assert results["recipe"]["name"] == "fm+jm" and results["best"]["stopped_early"]
    assert results["final"]["test"]["acc"] > 0.8


def test_every_file_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    local = [link for link in links if not link.startswith("http")]
    assert local and all((README.parent / link).exists() for link in local), \
        [link for link in local if not (README.parent / link).exists()]
    assert len(README.read_bytes()) <= 8 * 1024  # a front door, not the manual
