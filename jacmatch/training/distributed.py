"""Multi-process training from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK).

Backends: gloo on CPU, nccl on CUDA. Outside torchrun everything runs in one process.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from ..core.draws import in_drawn_part
from ..errors import UsageError

__all__ = ["DistInfo", "init_distributed", "resolve_device", "GlobalBatchNorm", "global_batchnorm",
           "average_gradients", "broadcast_parameters", "agree_on_step", "any_process", "mean_across_processes",
           "gather_interleaved", "finish_distributed", "LiveDDPWarning"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device=cuda but no CUDA device is visible: use --device cpu")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when started by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        device = resolve_device(device_name, info)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


class LiveDDPWarning(UserWarning):
    """finish_distributed found a DistributedDataParallel module still alive: the process may
    hang at its exit."""


def finish_distributed() -> None:
    """Leave the process group at the end of a run that succeeded, once its
    DistributedDataParallel modules are gone: a gloo group left to the interpreter's exit can
    abort it (SIGABRT, "terminate called without an active exception").

    A DDP module's reducer holds the group too. Were it the group's last holder, its
    destructor, which keeps the GIL, would join gloo's worker threads while one of them waits
    for the GIL to free a finished collective's tensors: the process hangs at exit (seen in
    1 of 14 runs of a 2-process test, three of them side by side on 2 cores). The group's own
    destructor lets the GIL go. So DDP modules left in reference cycles are collected first,
    while the group is still registered, and a DDP module still referenced is named in a
    :class:`LiveDDPWarning`: drop it (``del``) before calling this."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    # type(o), not isinstance: no object's __class__ is looked up (torch's deprecated reduce_op warns on it)
    alive = sum(issubclass(type(o), nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    if alive:
        warnings.warn(f"{alive} DistributedDataParallel module(s) still referenced when leaving the process group: "
                      "its reducer will destroy the group while holding the GIL, which can hang the process "
                      "at exit; drop them (del) before finish_distributed()", LiveDDPWarning, stacklevel=2)
    dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """The sum over processes, differentiable any number of times: its backward is itself
    (every process's output depends on every process's input)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch of all processes, with a double backward.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only and its backward has no derivative, so a
    BatchNorm student could not take the Jacobian term's double backward with it. This one
    all-reduces the batch mean and variance through an all-reduce whose backward is itself:
    on CPU (gloo) and GPU alike, the statistics, the outputs and every derivative are those
    of one process holding the global batch (equal shares assumed, as
    ``DistributedSampler`` deals them; in a pass over a drawn part of the batch, the Jacobian
    terms' ``jacobian_fraction``, the shares are counted).

    Its collectives run inside the backward pass, which ``DistributedDataParallel``'s
    overlapping gradient all-reduces do not tolerate (gloo aborts): a model with it is
    trained without the DDP wrapper, its gradients averaged by :func:`average_gradients`.
    """

    group = None  # the process group of the statistics (set by global_batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)

        def all_reduce(t):
            return _AllReduceSum.apply(t, self.group)
        world = dist.get_world_size()
        count = x.numel() // x.shape[1] * world  # equal shares, as DistributedSampler deals them
        if in_drawn_part():  # a drawn part of the batch: each process's share is what it drew
            total = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
            dist.all_reduce(total, group=self.group)
            count = max(int(total.item()), 1)  # (no process drew a sample: outputs of no sample)
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / count
        centered = x - mean[None, :, None, None]
        var = all_reduce(centered.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * count / max(count - 1, 1))
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def global_batchnorm(model: nn.Module) -> nn.Module:
    """Make every ``BatchNorm2d`` of ``model`` a :class:`GlobalBatchNorm`, in place: the
    same parameter and buffer objects (an optimizer built before keeps them; checkpoints
    are unchanged). Every process must call it at the same point: it creates the process
    group the statistics use."""
    group = dist.new_group() if dist.is_available() and dist.is_initialized() else None
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm
            module.group = group
    return model


def average_gradients(model: nn.Module) -> None:
    """Average the parameters' gradients over the processes (what DDP does, in one
    all-reduce after the backward pass)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (what DDP does at construction)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def agree_on_step(n: int, bad: bool, info: DistInfo, device) -> tuple[float, bool]:
    """The processes' one agreement a step, in one all-reduce: this process's ``n``
    samples over the mean per process (1.0 for equal shares), and whether any process's
    terms are non-finite (then every process skips or stops, as one process would)."""
    t = torch.tensor([float(n), 1.0 if bad else 0.0], device=device)
    dist.all_reduce(t)
    return n * info.world_size / float(t[0]), bool(t[1] > 0)


def any_process(flag: bool, info: DistInfo, device) -> bool:
    """Whether any process says ``flag`` (so that all stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_interleaved(t: torch.Tensor) -> torch.Tensor:
    """Every process's share of the global batch, in the global batch's order: position g
    is process g mod W's sample g div W, as DistributedSampler deals them (equal shares)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *t.shape[1:])


def mean_across_processes(values: dict, device) -> dict:
    """Each value's mean over the processes."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}
