"""Jacobian matching inside the Hugging Face ``Trainer``: :class:`DistillationTrainer`.

::

    from jacmatch.integrations.transformers import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(...),
                                  train_dataset=train)            # CE + KD (τ = 8) + 10·JM
    trainer.train()

- Its ``compute_loss`` builds the objective around the model the Trainer hands it: the
  DDP-wrapped one under ``torchrun``, so the student's gradients are synchronised (an
  objective built in ``__init__`` from the bare model trains each process on its own).
- Students and teachers may be Hugging Face image classifiers (their ``ImageClassifierOutput``'s
  ``logits`` are taken) or any ``nn.Module`` returning logits. The batch's images are
  ``inputs[input_key]`` (``pixel_values``) and its labels ``inputs[label_key]`` (``labels``).
- A student's attention runs on PyTorch's math kernel during the step, which has the double
  backward the Jacobian term takes (a ViT with its default ``sdpa`` attention trains).
- The teacher is frozen, kept in eval mode, moved to the Trainer's device, never in the
  optimizer (it is not the Trainer's model) and never saved.
- The terms are logged with the Trainer's own logs: ``ce``, ``kd``, ``jm``, … (each the
  mean over the steps since the last log and over the processes, unweighted; ``loss`` is
  their weighted sum).
- Under ``fp16`` the student's input gradients are taken with the gradient scaler's scale
  (PyTorch's AMP gradient-penalty recipe); the Trainer's scaler skips overflowing steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._extras import require
from ..core.objective import ObjectiveConfig, TransferObjective
from ..core.terms import Term
from ..errors import UsageError

transformers = require("transformers", "transformers")

__all__ = ["DistillationTrainer"]


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is jacmatch's objective: ``objective`` (an
    :class:`~jacmatch.core.objective.ObjectiveConfig`, default CE + KD τ = 8 + 10·JM) or
    ``terms``, with ``teacher`` frozen. Other arguments are the Trainer's.

    ``recipe``: a recipe's objective and views instead (``"fm+jm"``: KD at τ = 16 with 10·JM;
    random crops, flips where ``hflip`` says they keep the classes, and mixup α = 1 with soft
    labels), applied to each training batch in ``compute_loss``, drawn from ``args.seed`` and
    the process's rank. The optimiser stays ``TrainingArguments``' (the recipe trains with
    Adam at lr 0.01, constant: ``learning_rate=0.01, lr_scheduler_type="constant"``)."""

    loss_is_scaled_for_ga = False  # the objective is a per-batch mean: the Trainer divides it for accumulation

    def __init__(self, *args: Any, teacher: nn.Module | None = None, objective: ObjectiveConfig | None = None,
                 terms: Sequence[Term] | None = None, input_key: str = "pixel_values", label_key: str = "labels",
                 student_output: str | int | None = None, teacher_output: str | int | None = None,
                 recipe: str | None = None, hflip: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._views: dict = {}
        if recipe is not None:
            from ..training.recipes import recipe as recipe_config
            if objective is not None or terms is not None:
                raise UsageError("recipe= sets the objective: pass it without objective= or terms=")
            chosen = recipe_config(recipe)
            objective, d = chosen.objective, chosen.data
            self._views = {"augment": d.augment, "crop_padding": d.crop_padding, "mixup": d.mixup,
                           "cutmix": d.cutmix, "hflip": hflip}
        self._draws: torch.Generator | None = None
        if teacher is None and terms is None and (objective or ObjectiveConfig()).needs_teacher:
            raise UsageError("DistillationTrainer without a teacher trains CE only: pass teacher=..., or "
                             "objective=ObjectiveConfig(beta=0, gamma=0)")
        if teacher is not None:
            teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.teacher = teacher
        self._options = {"config": objective, "terms": terms, "student_output": student_output,
                         "teacher_output": teacher_output}
        self.input_key, self.label_key = input_key, label_key
        self._objectives: dict[int, TransferObjective] = {}
        self._sums: dict[str, float] = {}
        self._count = 0

    def objective_for(self, model: nn.Module) -> TransferObjective:
        """The objective around ``model`` as the Trainer hands it (wrapped or not), built once."""
        key = id(model)
        if key not in self._objectives:
            options = dict(self._options)
            terms = options.pop("terms")
            if terms is not None:  # one set of term modules, shared by the objectives of the wrapped and bare model
                options["terms"] = terms
                options.pop("config")
            self._objectives[key] = TransferObjective(model, self.teacher, **options)
        return self._objectives[key]

    def _grad_scale(self) -> float | None:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        missing = [k for k in (self.input_key, self.label_key) if k not in inputs]
        if missing:
            raise UsageError(f"the batch has no {missing} (its keys: {sorted(inputs)}): set input_key= and "
                             "label_key= to the keys of the images and the labels")
        x, y = inputs[self.input_key], inputs[self.label_key]
        objective = self.objective_for(model)
        if model.training:
            x, y = self._with_views(x, y, objective)
            logits, total, terms = objective(x, y, grad_scale=self._grad_scale(), step=self.state.global_step)
            for k, v in terms.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
            self._count += 1
        else:  # evaluation: the student's loss on the batch, without the teacher's Jacobians
            with torch.no_grad():
                logits = objective._student_fn(x)
            total = torch.nn.functional.cross_entropy(logits, y)
        return (total, {"logits": logits}) if return_outputs else total

    def _with_views(self, x: Tensor, y: Tensor, objective: TransferObjective) -> tuple[Tensor, Tensor]:
        """The recipe's views of a training batch (drawn on the CPU): crops and flips, then
        mixup or CutMix with soft labels of the student's width."""
        v = self._views
        if not (v and (v["augment"] or v["mixup"] or v["cutmix"])):
            return x, y
        from ..data import random_crop_flip
        from ..data.augment import mix
        if self._draws is None:
            self._draws = torch.Generator().manual_seed(self.args.seed * 1_000_003 + 7919 * self.args.process_index + 3)
        xc, yc = x.cpu(), y.cpu()
        if v["augment"]:
            xc = random_crop_flip(xc, v["crop_padding"], v["hflip"], self._draws)
        if v["mixup"] or v["cutmix"]:
            with torch.no_grad():
                classes = objective._student_fn(x[:1]).shape[1]
            xc, yc = mix(xc, yc, classes, v["mixup"], v["cutmix"], self._draws)
        return xc.to(x.device), yc.to(x.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._count and "loss" in logs:  # a training log: the terms' means since the last one, over processes
            keys = sorted(self._sums)
            means = torch.tensor([self._sums[k] / self._count for k in keys], device=self.args.device)
            means = self.accelerator.reduce(means, reduction="mean")
            logs = {**logs, **{k: float(v) for k, v in zip(keys, means)}}
            self._sums, self._count = {}, 0
        super().log(logs, *args, **kwargs)
