"""jacmatch inside torchdistill's own distillation box, from the shipped YAML (the torch
2.14.1 venv of `make vision-venv`: torchdistill needs torchvision)."""

import pytest
import torch
from helpers import REFERENCE_LR, copy_model, same_weights

pytestmark = pytest.mark.vision

YAML = "torchdistill/kd_jm"


def _box(teacher, student, x, y, **train_over):
    """torchdistill's DistillationBox from the shipped YAML, the data in order, plain SGD."""
    import jacmatch.integrations.torchdistill  # noqa: F401  (registers the names the YAML uses)
    from torchdistill.common import yaml_util
    from torchdistill.core.distillation import get_distillation_box
    from jacmatch.training.config import find_config
    config = yaml_util.load_yaml_file(str(find_config(YAML)))["train"]
    loader = config["train_data_loader"]
    loader["sampler"] = {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": None}
    loader["kwargs"]["batch_size"] = len(y)
    config["optimizer"]["kwargs"] = {"lr": REFERENCE_LR, "momentum": 0.0, "weight_decay": 0.0}
    config.update(train_over)
    dataset = torch.utils.data.TensorDataset(x, y)
    return get_distillation_box(teacher, student, {"train": dataset}, config, torch.device("cpu"), None, False, 1)


def test_the_shipped_yaml_trains_with_one_teacher_pass_and_the_trainers_first_step(trainer_step):
    """Its first step equals jacmatch's own trainer's on the same batch (the same weights
    after one SGD step, so the same gradients), and the teacher runs once per step."""
    student, teacher = copy_model(trainer_step["before"]), copy_model(trainer_step["teacher"])
    calls = {"n": 0}
    teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    box = _box(teacher, student, trainer_step["x"], trainer_step["y"])
    box.pre_epoch_process(epoch=0)
    batches = 0
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        batches += 1
    assert batches == 1 and calls["n"] == 1
    terms = trainer_step["terms"]
    assert loss.item() == pytest.approx(terms["ce"] + terms["kd"] + 10 * terms["jm"], rel=1e-5)
    same_weights(student, trainer_step["after"], atol=1e-5)  # the trainer's teacher has BatchNorm folded


def test_a_yaml_without_the_forward_processes_is_named_in_one_line(trainer_step):
    import jacmatch as jm
    student, teacher = copy_model(trainer_step["before"]), copy_model(trainer_step["teacher"])
    box = _box(teacher, student, trainer_step["x"], trainer_step["y"])
    box.student_forward_proc = lambda model, sample_batch, *a, **k: model(sample_batch)
    sample_batch, targets, supp_dict = next(iter(box.train_data_loader))
    with pytest.raises(jm.UsageError, match="jacmatch_student_forward") as refused:
        box.forward_process(sample_batch, targets, supp_dict)
    assert "\n" not in str(refused.value)


def test_the_readme_snippet_trains_through_the_distillation_box(tmp_path, monkeypatch):
    from helpers import README, readme_snippets
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippets()["torchdistill"], str(README), "exec"), scope)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in scope["student"].parameters())
    assert scope["box"].optimizer.param_groups[0]["params"][0] is next(scope["student"].parameters())
