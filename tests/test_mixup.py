"""Mixup and CutMix: consistent teaching (the teacher sees the student's mixed view), CE on
the mixed labels, every term at the mixed input; pinned against a step written by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN

import jacmatch as jm
from jacmatch.data.augment import mix


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)


def test_mixup_pairs_each_sample_with_a_partner_and_mixes_the_labels_by_the_same_weight():
    x, _ = _batch()
    y = torch.arange(6)  # every label its own: each soft label tells its weight and its partner
    mixed, soft = mix(x, y, 6, 0.4, 0.0, torch.Generator().manual_seed(1))
    assert torch.allclose(soft.sum(1), torch.ones(6, dtype=soft.dtype))
    for i in range(6):
        lam = float(soft[i, i])
        partner = int(soft[i].clone().index_fill_(0, torch.tensor([i]), -1).argmax()) if lam < 1 else i
        torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[partner])


def test_cutmix_pastes_a_box_and_weighs_the_labels_by_its_area():
    x, y = torch.zeros(8, 1, 10, 10), torch.zeros(8, dtype=torch.long)
    x[::2] = 1.0  # samples 0, 2, 4, 6 white; their labels 1
    y[::2] = 1
    mixed, soft = mix(x, y, 2, 0.0, 1.0, torch.Generator().manual_seed(2))
    for i in range(8):  # the label's share of each class is the share of its pixels
        assert float(soft[i, 1]) == pytest.approx(float(mixed[i].mean()), abs=1e-6)


def test_the_objectives_mixed_step_equals_one_written_by_hand():
    """CE on the soft labels, KD and JM (teacher's top-1, normalized) with the teacher on the
    mixed images: the objective's total and terms equal the functions of docs/method.md."""
    torch.manual_seed(0)
    student, teacher = SmallCNN(k=5).double().eval(), SmallCNN(k=5).double().eval()
    x, y = _batch()
    mixed, soft = mix(x, y, 5, 0.4, 1.0, torch.Generator().manual_seed(7))
    cfg = jm.ObjectiveConfig(alpha=1, beta=1, gamma=10, temperature=4, teacher_fold_bn=False,
                             teacher_channels_last=False)
    _, total, terms = jm.TransferObjective(student, teacher, cfg).eval()(mixed, soft)
    xs = mixed.clone().requires_grad_()
    zs, zt = student(xs), teacher(mixed)
    ce = -(soft * F.log_softmax(zs, 1)).sum(1).mean()
    kd = jm.kd_loss(zs, zt, 4.0)
    top = jm.teacher_top1(zt)
    xt = mixed.clone().requires_grad_()
    jt = jm.input_jacobian(teacher(xt), xt, top)
    js = jm.input_jacobian(zs, xs, top, create_graph=True)
    jmatch = jm.jacobian_matching_loss(js, jt, "normalized")
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["kd"], kd)
    torch.testing.assert_close(terms["jm"], jmatch)
    torch.testing.assert_close(total, ce + kd + 10 * jmatch)


def test_mixup_and_cutmix_train_from_the_command_line_and_the_api(tmp_path, teacher, capsys):
    import json

    from jacmatch.cli import main
    from jacmatch.training import config_from_dict, train
    assert main(["distill", "--teacher", teacher, "--dataset", "synthetic", "--samples-per-class", "4", "--recipe", "none",
                 "--model", "small_cnn_4", "--mixup", "0.2", "--cutmix", "1.0", "--out", str(tmp_path / "cli"),
                 "--set", "optim.epochs=1", "--set", "progress=false"]) == 0
    assert "the teacher cache is off: data.mixup, data.cutmix" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert recorded["config"]["data"]["mixup"] == 0.2 and "teacher_cache" not in recorded
    values = {"out_dir": str(tmp_path / "api"), "teacher": teacher, "progress": False,
              "data": {"name": "synthetic", "samples_per_class": 4, "mixup": 0.2}, "model": {"name": "small_cnn_4"},
              "optim": {"epochs": 1}}
    with pytest.warns(jm.training.trainer.CacheOffWarning):
        assert train(config_from_dict(values))["final"]["test"]["acc"] >= 0


def test_mixup_with_skipped_samples_under_ddp_is_refused_before_training(tmp_path, teacher):
    """Under DDP the partners come from every process's share; a skipped unreadable sample
    would misalign the shares, so the combination is one line before any work."""
    from jacmatch.training import config_from_dict, train
    from jacmatch.training.distributed import DistInfo
    values = {"out_dir": str(tmp_path / "r"), "teacher": teacher, "progress": False, "model": {"name": "small_cnn_4"},
              "data": {"name": "synthetic", "samples_per_class": 4, "mixup": 0.2, "on_bad_sample": "skip"}}
    with pytest.raises(jm.UsageError, match="mixup and CutMix pair samples across the processes"):
        train(config_from_dict(values), info=DistInfo(rank=1, world_size=2))  # (rank 1: no run folder claimed)
