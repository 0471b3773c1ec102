"""Your loop: Lightning and the Hugging Face Trainer against the real frameworks, under DDP
with real processes (torchdistill, which needs torchvision, is in test_vision.py).

Each integration's first step is pinned against jacmatch's own trainer on the same batch:
one plain SGD step from the same weights gives the same weights (so the same gradients)
and the same terms."""

import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import transformers
from helpers import REFERENCE_LR, SmallCNN, copy_model, run, same_weights

import jacmatch as jm


SCRIPTS = Path(__file__).parent / "scripts"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


# ---- the reference (conftest.trainer_step: one step of jacmatch's own trainer) ----------------


# ---- Lightning ------------------------------------------------------------------------------


@pytest.mark.slow
def test_lightning_first_step_equals_the_trainers(trainer_step):
    from jacmatch.integrations.lightning import DistillationModule
    student = copy_model(trainer_step["before"])
    module = DistillationModule(student, trainer_step["teacher"], optimizer=lambda p: torch.optim.SGD(p, lr=REFERENCE_LR))
    x, y = trainer_step["x"], trainer_step["y"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    same_weights(student, trainer_step["after"])
    logged = {k.split("/")[1].removesuffix("_step"): float(v) for k, v in trainer.logged_metrics.items()
              if k.endswith("_step")}
    for key, value in trainer_step["terms"].items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key


def test_lightning_teacher_is_frozen_in_eval_mode_out_of_the_optimizer_and_the_checkpoint():
    from jacmatch.integrations.lightning import TEACHER_PREFIX, DistillationModule
    student, teacher = SmallCNN(k=5), SmallCNN(k=5)
    module = DistillationModule(student, teacher, save_teacher=False)
    module.train()
    assert student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in student.parameters()}
    checkpoint = {"state_dict": module.state_dict()}
    assert any(k.startswith(TEACHER_PREFIX) for k in checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith(TEACHER_PREFIX) for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # a checkpoint without the teacher loads strictly: the module's own
    module.load_state_dict(checkpoint["state_dict"])
    kept = {"state_dict": module.state_dict()}
    DistillationModule(student, teacher, save_teacher=True).on_save_checkpoint(kept)
    assert any(k.startswith(TEACHER_PREFIX) for k in kept["state_dict"])
    with pytest.raises(jm.UsageError, match="trains CE only"):
        DistillationModule(student)


@pytest.mark.slow
def test_lightning_ddp_two_processes_give_the_weights_of_one(tmp_path):
    """strategy="ddp" with 2 CPU processes (gloo), a BatchNorm student with GlobalBatchNorm:
    the weights after 3 steps equal one process's on the batches of both, to 1e-5."""
    runs = {}
    for devices, batch in ((1, 16), (2, 8)):
        out = tmp_path / f"{devices}.pt"
        run([sys.executable, SCRIPTS / "lightning_fit.py", out, str(devices), str(batch), "3"], cwd=tmp_path,
            env=ENV, check=True)
        runs[devices] = torch.load(out)
    one, two = runs[1]["student"], runs[2]["student"]
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst <= 1e-5, worst
    assert any("running_mean" in k for k in one)  # a BatchNorm student, its statistics global
    assert runs[2]["logged"]["train/jm_step"] == pytest.approx(runs[1]["logged"]["train/jm_step"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_trains(precision, monkeypatch):
    """bf16-mixed and 16-mixed (a GradScaler on CPU): the weights stay finite, and under
    16-mixed the student's input gradients are taken with the scaler's scale."""
    from jacmatch.integrations.lightning import DistillationModule
    sys.path.insert(0, str(SCRIPTS))
    import lightning_fit
    scales = []
    real = jm.TransferObjective.forward

    def spy(self, x, y, targets=None, *, grad_scale=None, **kwargs):
        scales.append(grad_scale)
        return real(self, x, y, targets, grad_scale=grad_scale, **kwargs)
    monkeypatch.setattr(jm.TransferObjective, "forward", spy)
    x, y = lightning_fit.data()
    student, teacher = lightning_fit.models()
    module = DistillationModule(student, teacher, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    # Lightning maps Trainer(precision="16-mixed") on CPU to bf16: its fp16 plugin, given itself, runs there
    from pytorch_lightning.plugins.precision import MixedPrecision
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, plugins=[MixedPrecision(precision, "cpu")], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    assert len(scales) == 4
    assert all(s is None for s in scales) if precision == "bf16-mixed" else all(s and s > 1 for s in scales)
    assert all(torch.isfinite(p).all() for p in student.parameters())


# ---- the Hugging Face Trainer ----------------------------------------------------------------


def _hf_args(tmp_path, batch, **over):
    settings = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=batch, max_steps=1, learning_rate=REFERENCE_LR,
                    optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **over})


class _InOrder(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.slow
def test_hf_trainer_first_step_equals_the_trainers(trainer_step, tmp_path):
    from jacmatch.integrations.transformers import DistillationTrainer

    class InOrder(DistillationTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)
    student = copy_model(trainer_step["before"])
    x, y = trainer_step["x"], trainer_step["y"]
    trainer = InOrder(model=student, teacher=trainer_step["teacher"], args=_hf_args(tmp_path, len(y)),
                      train_dataset=_InOrder(x, y))
    trainer.train()
    same_weights(student, trainer_step["after"])
    logged = trainer.state.log_history[0]
    for key, value in trainer_step["terms"].items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
def test_hf_trainer_under_torchrun_two_processes_give_the_weights_of_one(tmp_path):
    """The objective is built around the model the Trainer hands compute_loss (DDP-wrapped
    under torchrun): both processes end with the weights of one process, to 1e-5."""
    run([sys.executable, SCRIPTS / "hf_train.py", tmp_path / "one", "16", "3"], cwd=tmp_path, env=ENV, check=True)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPTS / "hf_train.py",
         tmp_path / "two", "8", "3"], cwd=tmp_path, env=ENV, check=True)
    reference = torch.load(tmp_path / "one.rank0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"two.rank{rank}.pt")
        worst = max((got["student"][k] - v).abs().max().item() for k, v in reference["student"].items())
        assert worst <= 1e-5, (rank, worst)
        # the logged terms are the means over both processes' samples
        assert got["logs"][0]["jm"] == pytest.approx(reference["logs"][0]["jm"], rel=1e-4)


def test_hf_vit_with_its_default_attention_takes_a_kd_jm_step(tmp_path):
    """A ViTForImageClassification student (sdpa attention, whose fused CPU kernel has no
    double backward) takes a KD + JM step through the Trainer, and without the objective's
    math kernel the same step fails: what the test guards is real."""
    from jacmatch.integrations.transformers import DistillationTrainer
    sys.path.insert(0, str(SCRIPTS))
    import hf_train
    student, teacher = hf_train.vit(), hf_train.vit(seed=5)
    assert student.config._attn_implementation == "sdpa"
    x = torch.rand(4, 1, 8, 8)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=_hf_args(tmp_path, 4, learning_rate=0.01),
                                  train_dataset=_InOrder(x, torch.tensor([0, 1, 2, 3])))
    trainer.train()
    assert trainer.state.log_history[0]["jm"] > 0
    xs = x.clone().requires_grad_()
    zs = student(xs).logits
    with pytest.raises(RuntimeError, match="derivative for"):
        jm.JacobianMatchingLoss()(xs, zs, lambda z: teacher(z).logits).backward()


def test_hf_trainer_names_a_missing_batch_key(tmp_path):
    from jacmatch.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=SmallCNN(k=5), teacher=SmallCNN(k=5), args=_hf_args(tmp_path, 2))
    with pytest.raises(jm.UsageError, match=r"the batch has no \['pixel_values'\]"):
        trainer.compute_loss(trainer.model, {"image": torch.rand(2, 1, 6, 6), "labels": torch.tensor([0, 1])})


@pytest.mark.slow
def test_hf_trainer_takes_a_recipes_objective_and_views(tmp_path):
    """recipe='fm+jm': the recipe's objective (KD at τ = 16, 10·JM, no CE) and its views: each
    training batch reaches the objective cropped and mixed, with soft labels."""
    from jacmatch.integrations.transformers import DistillationTrainer
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 6, 6), torch.arange(8) % 5
    trainer = DistillationTrainer(model=SmallCNN(k=5), teacher=SmallCNN(k=5), recipe="fm+jm",
                                  args=_hf_args(tmp_path, 8, max_steps=2), train_dataset=_InOrder(x, y))
    objective = trainer.objective_for(trainer.model)
    assert (objective.config.alpha, objective.config.temperature, objective.config.gamma) == (0.0, 16.0, 10.0)
    seen, real = [], objective.forward
    objective.forward = lambda xb, yb, *a, **k: (seen.append((xb, yb)), real(xb, yb, *a, **k))[1]
    trainer.train()
    assert len(seen) == 2 and all(yb.shape == (8, 5) and torch.allclose(yb.sum(1), torch.ones(8)) for _, yb in seen)
    assert not any(torch.equal(xb.sort(0).values, x.sort(0).values) for xb, _ in seen)  # new views, not the batch
    with pytest.raises(jm.UsageError, match="recipe= sets the objective"):
        DistillationTrainer(model=SmallCNN(k=5), teacher=SmallCNN(k=5), recipe="fm+jm",
                            objective=jm.ObjectiveConfig(), args=_hf_args(tmp_path, 8))
