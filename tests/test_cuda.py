"""The GPU path (`make gpu-check` runs these on a CUDA machine; on CPU they skip, saying why)."""

import pytest
import torch

import jacmatch as jm
from jacmatch.models import create_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")]


def pair(classes=10):
    torch.manual_seed(0)
    teacher = create_model("resnet20", classes, 3).eval()
    student = create_model("small_cnn_8", classes, 3)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, classes, (16,))
    return teacher, student, x, y


@pytest.mark.parametrize("outputs", ["teacher_top1", "projection", "input_jvp"])
def test_the_objective_on_cuda_matches_cpu(outputs):
    teacher, student, x, y = pair()
    form = "sq" if outputs == "input_jvp" else "normalized"
    cfg = jm.ObjectiveConfig(beta=1, gamma=1, jm_outputs=outputs, jm_form=form, teacher_fold_bn=True)
    values = {}
    for device in ("cpu", "cuda"):
        obj = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(0)).to(device)
        _, total, terms = obj(x.to(device), y.to(device))
        values[device] = {k: float(v) for k, v in terms.items()}
        obj.to("cpu")
    for k, v in values["cpu"].items():
        assert values["cuda"][k] == pytest.approx(v, rel=1e-3, abs=1e-5), (k, values)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_distillation_trains(tmp_path, amp):
    from jacmatch.training import config_from_dict, train
    quiet = {"progress": False, "tensorboard": False, "device": "cuda"}
    train(config_from_dict({"out_dir": str(tmp_path / "t"), "data": {"name": "synthetic"},
                            "model": {"name": "small_cnn_8"}, "optim": {"epochs": 1}, **quiet}))
    r = train(config_from_dict({"out_dir": str(tmp_path / "s"), "teacher": str(tmp_path / "t" / "last.pt"),
                                "data": {"name": "synthetic", "samples_per_class": 8}, "model": {"name": "small_cnn_4"},
                                "objective": {"beta": 1.0, "gamma": 1.0}, "amp": amp, "optim": {"epochs": 2},
                                **quiet}))
    assert all(torch.isfinite(torch.tensor(v)) for v in r["final"]["train"].values()), r["final"]
    assert 0.0 <= r["final"]["test"]["acc"] <= 1.0
