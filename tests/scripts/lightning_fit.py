"""Fit jacmatch's DistillationModule with Lightning on fixed data; rank 0 saves the student.

    python lightning_fit.py OUT DEVICES BATCH STEPS [PRECISION]

Launched by tests/test_integrations.py: ``strategy="ddp"`` re-runs this script in each
process, which a test's own process cannot be.
"""

import sys

import pytorch_lightning as pl
import torch

from jacmatch import ObjectiveConfig
from jacmatch.integrations.lightning import DistillationModule
from jacmatch.models import create_model


def data(n=32, k=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, k, (n,), generator=g)


def models(k=4):
    torch.manual_seed(1)
    teacher = create_model("small_cnn_8", k, 1, batchnorm=True)
    torch.manual_seed(2)
    student = create_model("small_cnn_4", k, 1, batchnorm=True)
    return student, teacher


def main(out, devices, batch, steps, precision="32-true"):
    x, y = data()
    student, teacher = models()
    module = DistillationModule(student, teacher, ObjectiveConfig(),
                                optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sync_batchnorm=True)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=steps, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         use_distributed_sampler=False)
    dataset = torch.utils.data.TensorDataset(x, y)
    # Lightning's own sampler would shuffle: in order, process r takes samples r, r + W, ..., so
    # that the processes' batches together are the one process's batch of W times the size.
    sampler = torch.utils.data.DistributedSampler(dataset, devices, trainer.global_rank, shuffle=False) \
        if devices > 1 else None
    trainer.fit(module, torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler))
    if trainer.is_global_zero:
        torch.save({"student": student.state_dict(),
                    "logged": {k: float(v) for k, v in trainer.logged_metrics.items()}}, out)


if __name__ == "__main__":
    out, devices, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    main(out, devices, batch, steps, *sys.argv[5:])
