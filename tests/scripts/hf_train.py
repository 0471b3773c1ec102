"""Train jacmatch's DistillationTrainer (the Hugging Face Trainer) on fixed data; every
process saves its student's weights.

    [torchrun --nproc_per_node=2] python hf_train.py OUT_PREFIX BATCH STEPS

Samples are taken in order; under torchrun accelerate deals process r the batches r, r + W,
..., so that the processes' batches together are the one process's batch of W times the size.
"""

import os
import sys
import warnings

import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from jacmatch import ObjectiveConfig
from jacmatch.integrations.transformers import DistillationTrainer
from jacmatch.models import create_model
from jacmatch.training.distributed import LiveDDPWarning, finish_distributed

warnings.simplefilter("error", LiveDDPWarning)  # a DDP module left to outlive the group can hang the exit


def data(n=32, k=4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def vit(k=4, seed=2):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               num_labels=k))


class InOrder(DistillationTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def main(prefix, batch, steps):
    torch.manual_seed(1)
    teacher = create_model("small_cnn_8", 4, 1)
    args = TrainingArguments(output_dir=os.path.dirname(prefix) or ".", per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=0.01, optim="sgd", lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False,
                             disable_tqdm=True, ddp_backend="gloo" if "RANK" in os.environ else None)
    trainer = InOrder(model=vit(), teacher=teacher, objective=ObjectiveConfig(), args=args, train_dataset=data())
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"student": trainer.model.state_dict(), "logs": trainer.state.log_history}, f"{prefix}.rank{rank}.pt")
    del trainer  # and with it the DDP-wrapped student, whose reducer must not be the group's last holder
    finish_distributed()  # accelerate's gloo group, left to the interpreter's exit, can abort it


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
