"""Jacobian matching inside PyTorch Lightning: a LightningModule and a DataModule.

:class:`DistillationModule` holds a student, an optional frozen teacher and a
:class:`~jacmatch.core.objective.TransferObjective`; each ``training_step`` is one call of
the objective, and every term is logged (``train/ce``, ``train/kd``, ``train/jm``, …, and
``train/loss``)::

    import pytorch_lightning as pl
    from jacmatch.integrations.lightning import DistillationModule

    module = DistillationModule(student, teacher)          # CE + KD (τ = 8) + 10·JM
    pl.Trainer(max_epochs=5, strategy="ddp", devices=2).fit(module, train_loader)

- The teacher is frozen, stays in eval mode whatever Lightning calls, is left out of the
  optimizer, and is left out of checkpoints unless ``save_teacher=True`` (loading a
  checkpoint without it keeps the module's own teacher).
- Under ``strategy="ddp"`` a BatchNorm student computes its statistics over the global
  batch with ``sync_batchnorm=True``: :class:`~jacmatch.training.distributed.GlobalBatchNorm`,
  on CPU and GPU alike. It has the double backward that the Jacobian term takes;
  ``torch.nn.SyncBatchNorm`` has none (its backward's kernels have no derivative) and runs
  on GPUs only, so leave Lightning's own ``Trainer(sync_batchnorm=True)`` off.
- Under ``precision="16-mixed"`` the student's input gradients are taken with the
  precision plugin's gradient scale (PyTorch's AMP gradient-penalty recipe; see
  :func:`~jacmatch.core.jacobian.scaled_gradients`); an overflow makes Lightning's scaler
  skip the step and lower its scale. ``bf16-mixed`` needs no scale.

:class:`JacmatchDataModule` serves any data set jacmatch reads (a built-in name, a folder of
class subfolders, ``npz:``, ``hf:``, ``package.module:callable``) with jacmatch's own
splits, few-sample subsets and validation split, from a :class:`~jacmatch.data.config.DataConfig`.
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._extras import require
from ..core.objective import ObjectiveConfig, TransferObjective
from ..core.terms import Term
from ..errors import UsageError
from ..training.distributed import global_batchnorm

pl = require("pytorch_lightning", "lightning")

__all__ = ["DistillationModule", "JacmatchDataModule", "SplitDataset", "SkippedSamplesWarning"]

TEACHER_PREFIX = "objective.teacher."


def _adam(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=1e-3)


class DistillationModule(pl.LightningModule):
    """A student distilled from a frozen teacher by ``objective`` (an
    :class:`~jacmatch.core.objective.ObjectiveConfig`, default CE + KD τ = 8 + 10·JM) or by
    ``terms``. ``optimizer``: a function of the student's parameters (default Adam, lr 1e-3);
    ``scheduler``: a function of the optimizer, or None. ``sync_batchnorm``: BatchNorm over
    the global batch under DDP (see the module's docstring). ``recipe``: a recipe's objective
    and optimiser instead (``"fm+jm"``: KD at τ = 16 with 10·JM, Adam at lr 0.01; its views
    come from ``JacmatchDataModule(recipe=...)``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 objective: ObjectiveConfig | None = None, *, terms: Sequence[Term] | None = None,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = _adam,
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                 save_teacher: bool = False, sync_batchnorm: bool = False,
                 student_output: str | int | None = None, teacher_output: str | int | None = None,
                 recipe: str | None = None):
        super().__init__()
        if recipe is not None:  # the recipe's objective and optimiser (its views: JacmatchDataModule(recipe=...))
            from ..training.recipes import recipe as recipe_config
            if objective is not None or terms is not None or optimizer is not _adam:
                raise UsageError("recipe= sets the objective and the optimiser: pass it without objective=, "
                                 "terms= or optimizer=")
            chosen = recipe_config(recipe)
            objective, lr = chosen.objective, chosen.optim.lr

            def optimizer(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
                return torch.optim.Adam(parameters, lr=lr)
        if teacher is None and terms is None:
            objective = objective or ObjectiveConfig()
            if objective.needs_teacher:
                raise UsageError("DistillationModule without a teacher trains CE only: pass teacher=..., or "
                                 "objective=ObjectiveConfig(beta=0, gamma=0)")
        self.objective = TransferObjective(student, teacher, objective, terms=terms,
                                           student_output=student_output, teacher_output=teacher_output)
        self._optimizer, self._scheduler = optimizer, scheduler
        self.save_teacher = save_teacher
        self.sync_batchnorm = sync_batchnorm

    @property
    def student(self) -> nn.Module:
        return self.objective.student

    @property
    def teacher(self) -> nn.Module | None:
        return self.objective.teacher

    def forward(self, x: Tensor) -> Any:
        return self.student(x)

    def setup(self, stage: str) -> None:
        if self.sync_batchnorm and torch.distributed.is_available() and torch.distributed.is_initialized():
            global_batchnorm(self.student)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _grad_scale(self) -> float | None:
        """The fp16 gradient scale of Lightning's precision plugin, when there is one."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer else None
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        # (the trainer's optimizer steps: what the Jacobian terms' schedule counts, across a resume too)
        _, total, terms = self.objective(x, y, grad_scale=self._grad_scale(), step=self.global_step)
        batch_size = x.shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, on_epoch=True,
                      batch_size=batch_size, sync_dist=True)
        self.log("train/loss", total.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=True)
        return total

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._accuracy("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._accuracy("test", batch)

    def _accuracy(self, split: str, batch: Any) -> None:
        x, y = batch[0], batch[1]
        logits = self.objective._student_fn(x)
        self.log(f"{split}/acc", (logits.argmax(dim=1) == y).float().mean(), batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer(p for p in self.student.parameters() if p.requires_grad)
        if self._scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not self.save_teacher:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if state is not None and self.teacher is not None and not any(k.startswith(TEACHER_PREFIX) for k in state):
            state.update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
        self.objective.reset_teacher()


class SplitDataset(torch.utils.data.Dataset):
    """A jacmatch split (train, val or test of :class:`~jacmatch.data.datasets.DataSplits`)
    as a map-style dataset of ``(image, label)``: float images in [0, 1], fetched a batch
    at a time (``__getitems__``) through the split's own reader."""

    def __init__(self, split: Any):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        items = self.__getitems__([i])
        if not items:
            raise IndexError(f"sample {i} cannot be read (data.on_bad_sample=skip): {self.split.bad.first}")
        return items[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        x, y = self.split.batch(torch.tensor(indices))
        if len(x) < len(indices):  # said, not dropped without a word
            warnings.warn(SkippedSamplesWarning(
                f"skipped {len(indices) - len(x)} unreadable sample(s) of a batch of {len(indices)} "
                f"(data.on_bad_sample=skip; {self.split.bad.count} found so far); the first: {self.split.bad.first}"),
                stacklevel=2)
        return list(zip(x, y))


class SkippedSamplesWarning(UserWarning):
    """A batch lost samples that cannot be read (data.on_bad_sample=skip)."""


class JacmatchDataModule(pl.LightningDataModule):
    """jacmatch's data seam for Lightning: ``data`` is a DataConfig (or its dict, e.g.
    ``{"name": "digits", "samples_per_class": 10}``), split as ``jacmatch distill`` splits
    it (``seed`` draws the few-sample subset). Lightning adds a DistributedSampler under DDP.

    ``recipe``: a recipe's data options (``fm+jm``: crops and flips, mixup α = 1) under the
    ``data`` dict. The training batches are augmented as ``data`` says (``augment``: random
    crops, and flips where they keep the classes; ``mixup``/``cutmix``: mixed images with
    soft labels, which :class:`DistillationModule`'s objective takes), drawn from ``seed`` and
    the process's rank. Under DDP each process mixes within its own share of the batch
    (``jacmatch distill`` pairs samples across the global batch)."""

    def __init__(self, data: Any = None, *, batch_size: int = 64, eval_batch_size: int = 500, seed: int = 0,
                 num_workers: int = 0, recipe: str | None = None):
        super().__init__()
        from ..data.config import DataConfig
        from ..training.config import config_from_dict, merge_values
        from ..training.recipes import recipe_values
        if recipe is not None:
            if isinstance(data, DataConfig):
                raise UsageError("recipe= takes the data options as a dict (the recipe's go under them), not a "
                                 "DataConfig")
            data = merge_values(recipe_values(recipe).get("data", {}), data or {})
        if isinstance(data, dict) or data is None:
            data = config_from_dict({"data": data or {}}).data
        if not isinstance(data, DataConfig):
            raise UsageError(f"data must be a DataConfig or a dict of its fields, got {type(data).__name__}")
        self.data_config, self.seed = data, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.splits: Any = None
        self._draws: torch.Generator | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training batch's views (``augment``, ``mixup``, ``cutmix``), on the CPU; other
        batches as they are."""
        from ..data import random_crop_flip
        from ..data.augment import mix
        d, trainer = self.data_config, getattr(self, "trainer", None)
        if trainer is None or not trainer.training or not (d.augment or d.mixup or d.cutmix):
            return batch
        if self._draws is None:
            self._draws = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * trainer.global_rank + 3)
        x, y = batch[0], batch[1]
        if d.augment:
            x = random_crop_flip(x, d.crop_padding, self.splits.hflip, self._draws)
        if d.mixup or d.cutmix:
            x, y = mix(x, y, self.splits.num_classes, d.mixup, d.cutmix, self._draws)
        return (x, y, *batch[2:])

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            from ..training.config import RunConfig
            from ..training.loading import load_data
            self.splits = load_data(RunConfig(data=self.data_config, seed=self.seed))

    @property
    def num_classes(self) -> int:
        self.setup()
        return int(self.splits.num_classes)

    def _loader(self, split: Any, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(SplitDataset(split), batch_size=batch_size, shuffle=shuffle,
                                           num_workers=self.num_workers)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.splits.train, self.batch_size, True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.splits.val, self.eval_batch_size, False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.splits.test, self.eval_batch_size, False)
