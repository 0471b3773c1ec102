"""``jacmatch bench``: what the Jacobian terms cost, as ratios measured in one run.

Every measured step is a full optimiser step of the student (SGD) on the same batch.
Time: the median of ``repeats`` steps after warm-up. Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` over one step; on CPU the peak resident-set growth
over one step (``VmHWM`` of /proc/self/status after resetting it through clear_refs,
with glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the RSS).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..atomic import write_json_atomic
from ..core import jacobian as J
from ..core.losses import jacobian_matching_loss, kd_loss
from ..core.objective import ObjectiveConfig, TransferObjective
from ..errors import UsageError
from ..models import create_model
from .markdown import format_table, plot_scaling
from ..experiments.common import machine_record

__all__ = ["main", "run_bench"]

#: Every distillation term off (ObjectiveConfig's defaults distil with KD + JM); each step sets its own.
OFF = {"beta": 0.0, "gamma": 0.0, "temperature": 4.0}

SHAPES = {  # name: (channels, size, classes, teacher, student)
    "mnist-like": (1, 28, 10, "resnet20", "small_cnn_8"),
    "cifar100-like": (3, 32, 100, "resnet20", "small_cnn_8"),
}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _fix_malloc() -> bool:
    """Fixed mmap and trim thresholds (128 KiB): freed tensors leave the resident set."""
    libc = _libc()
    if libc is None:
        return False
    return libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1  # MMAP, TRIM thresholds


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes: peak growth of allocated memory during one call of ``step``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # free heap pages out of the resident set before the baseline
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss("VmRSS")
    step()
    return _rss("VmHWM") - base


def time_step(step: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Setup:
    """A teacher, a student, one batch and an optimiser, all on ``device``."""

    def __init__(self, channels, size, classes, teacher, student, batch, device, seed=0):
        torch.manual_seed(seed)
        self.device = device
        self.teacher = create_model(teacher, classes, channels).to(device).eval().requires_grad_(False)
        self.student = create_model(student, classes, channels).to(device)
        self.opt = torch.optim.SGD(self.student.parameters(), lr=1e-3, momentum=0.9)
        self.student_cl = copy.deepcopy(self.student).to(memory_format=torch.channels_last)  # config channels_last
        self.opt_cl = torch.optim.SGD(self.student_cl.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch, channels, size, size, generator=g).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.classes = classes

    def objective_step(self, cached: bool = False, channels_last: bool = False, **weights) -> Callable[[], None]:
        """One optimiser step of the library's objective (the teacher as it runs it: BatchNorm
        folded, channels-last, unless ``weights`` say otherwise). Under ``jacobian_every`` = k
        a call takes k steps (one with the Jacobian terms, k − 1 without), and its ``calls``
        attribute says so: the table holds the time of one step, their mean."""
        cfg = ObjectiveConfig(**{**OFF, **weights})  # the terms that ``weights`` turn on, no others
        student, opt = (self.student_cl, self.opt_cl) if channels_last else (self.student, self.opt)
        obj = TransferObjective(student, self.teacher if cfg.needs_teacher else None, cfg,
                                generator=torch.Generator().manual_seed(0))
        targets = obj.teacher_targets(self.x, self.y, full_jacobian=True) if cached and cfg.needs_teacher else None
        params = list(student.parameters())

        def one():
            opt.zero_grad(set_to_none=True)
            _, total, _ = obj(self.x, self.y, targets)
            total.backward(inputs=params)  # as the trainer does: no gradient for the input
            opt.step()

        def step():
            for _ in range(cfg.jacobian_every):
                one()
        step.calls = cfg.jacobian_every  # type: ignore[attr-defined]
        return step

    def handwritten_step(self) -> Callable[[], None]:
        """KD + JM as a user writes it in plain PyTorch: the README's functional snippet
        (teacher top-1, normalized loss, the teacher frozen but run as it is)."""
        def step():
            self.opt.zero_grad(set_to_none=True)
            x = self.x.clone().requires_grad_()
            zs, zt = self.student(x), self.teacher(x)
            idx = J.teacher_top1(zt.detach())
            js = J.input_jacobian(zs, x, idx, create_graph=True)
            jt = J.input_jacobian(zt, x, idx)
            loss = F.cross_entropy(zs, self.y) + kd_loss(zs, zt) + jacobian_matching_loss(js, jt)
            loss.backward()
            self.opt.step()
        return step

    def naive_step(self, all_classes: bool) -> Callable[[], None]:
        """As public re-implementations write it: the teacher's gradient built with
        create_graph=True on parameters that require grad, one backward per class."""
        teacher = copy.deepcopy(self.teacher).requires_grad_(True)

        def step():
            self.opt.zero_grad(set_to_none=True)
            x = self.x.clone().requires_grad_()
            zs, zt = self.student(x), teacher(x)
            loss = F.cross_entropy(zs, self.y) + kd_loss(zs, zt)
            classes = range(self.classes) if all_classes else [None]
            for c in classes:
                idx = zt.argmax(1) if c is None else torch.full_like(self.y, c)
                gs = torch.autograd.grad(zs.gather(1, idx[:, None]).sum(), x, create_graph=True)[0]
                gt = torch.autograd.grad(zt.gather(1, idx[:, None]).sum(), x, create_graph=True)[0]
                loss = loss + jacobian_matching_loss(gs, gt)
            loss.backward()
            self.opt.step()
        return step


#: The schedules the bench times: k (``fm_jm_scheduled_over_fm``, ``jm_over_kd_cached_scheduled``,
#: the one recommended) and ρ (``*_rho_*``).
SCHEDULE_FRACTION, SCHEDULE_EVERY = 0.25, 4


def _interleaved_medians(steps: dict, device, repeats: int, classes: int) -> dict[str, float]:
    """Median seconds per step, measured in rounds that visit every step once, so that
    slow drifts of the machine (frequency, neighbours) touch all steps alike and the
    ratios stay fair. The slowest steps get a third of the rounds."""
    slow = {"naive_all_step", "noisy_kd_step_m16"} | ({"jm_exact_all_step"} if classes > 10 else set())
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name, step in steps.items():
            if name in slow and r >= max(3, repeats // 3):
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if name.endswith("_forward"):
                with torch.no_grad():
                    step()
            else:
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) / getattr(steps[name], "calls", 1) for name, v in times.items()}


def _step_table(s: Setup | None) -> dict[str, Callable[[], Callable[[], None]]]:
    """Every step the bench can time, by its JSON key, each built on demand (``s`` None:
    only the keys are wanted)."""
    kd = {"alpha": 1.0, "beta": 1.0}
    jm = {**kd, "gamma": 1.0}
    fm = {"alpha": 0.0, "beta": 1.0}  # function matching's step: KD alone, the teacher at every step (views change)
    rho, every = {"jacobian_fraction": SCHEDULE_FRACTION}, {"jacobian_every": SCHEDULE_EVERY}
    unfolded = {"teacher_fold_bn": False, "teacher_channels_last": False}
    o = s.objective_step if s is not None else None
    return {
        "teacher_forward": lambda: (lambda: s.teacher(s.x)),
        "student_forward": lambda: (lambda: s.student(s.x)),
        "ce_step": lambda: o(alpha=1.0),
        "kd_step": lambda: o(**kd),
        "jm_step": lambda: o(**jm, jm_outputs="teacher_top1"),
        "handwritten_step": lambda: s.handwritten_step(),
        "kd_step_unfolded": lambda: o(**kd, **unfolded),
        "jm_step_unfolded": lambda: o(**jm, **unfolded),
        "jm_step_teacher_contiguous": lambda: o(**jm, teacher_channels_last=False),
        "jm_proj_step": lambda: o(**jm, jm_outputs="projection", num_projections=1),
        "jm_fd_step": lambda: o(**jm, jm_outputs="input_fd", jm_form="sq"),
        "jm_jvp_step": lambda: o(**jm, jm_outputs="input_jvp", jm_form="sq"),
        "kd_step_cached": lambda: o(cached=True, **kd),
        "jm_step_cached": lambda: o(cached=True, **jm, jm_outputs="teacher_top1"),
        "jm_proj_step_cached": lambda: o(cached=True, **jm, jm_outputs="projection"),
        "noisy_kd_step_m1": lambda: o(**kd, noise_sigma=0.1, noise_draws=1),
        "noisy_kd_step_m4": lambda: o(**kd, noise_sigma=0.1, noise_draws=4),
        "fm_step": lambda: o(**fm),
        "fm_jm_step": lambda: o(**fm, gamma=1.0),
        "fm_jm_rho_step": lambda: o(**fm, gamma=1.0, **rho),
        "fm_jm_every_step": lambda: o(**fm, gamma=1.0, **every),
        "jm_step_cached_rho": lambda: o(cached=True, **jm, **rho),
        "jm_step_cached_every": lambda: o(cached=True, **jm, **every),
        # --full only: the slow ones, and comparisons that do not change between runs
        "jm_exact_all_step": lambda: o(**jm, jm_outputs="all"),
        "noisy_kd_step_m16": lambda: o(**kd, noise_sigma=0.1, noise_draws=16),
        "naive_top1_step": lambda: s.naive_step(all_classes=False),
        "naive_all_step": lambda: s.naive_step(all_classes=True),
        "ce_step_channels_last": lambda: o(channels_last=True, alpha=1.0),
        "jm_step_cached_channels_last": lambda: o(cached=True, channels_last=True, **jm, jm_outputs="teacher_top1"),
    }


#: The default bench: what the targets need and the estimators' costs (a few minutes on 2 cores).
DEFAULT_STEPS = ("teacher_forward", "student_forward", "ce_step", "kd_step", "jm_step", "handwritten_step",
                 "kd_step_unfolded", "jm_step_unfolded", "jm_step_teacher_contiguous", "jm_proj_step",
                 "jm_fd_step", "jm_jvp_step", "kd_step_cached", "jm_step_cached", "jm_proj_step_cached",
                 "noisy_kd_step_m1", "noisy_kd_step_m4", "fm_step", "fm_jm_step", "fm_jm_rho_step", "fm_jm_every_step",
                 "jm_step_cached_rho", "jm_step_cached_every")


@dataclass(frozen=True)
class Plan:
    """What one bench run measures: steps (JSON keys), shapes, sizes, and the scaling sweep."""

    steps: tuple[str, ...] = DEFAULT_STEPS
    shapes: tuple[str, ...] = tuple(SHAPES)
    repeats: int = 10
    batch: int = 128
    size: int | None = None  # the shapes' own sizes unless set
    scaling: bool = False

    @classmethod
    def choose(cls, only: str | None = None, full: bool = False, shape: str | None = None,
               smoke: bool = False) -> Plan:
        """The plan of ``jacmatch bench [--only kd,jm,jm_proj] [--full] [--shape NAME]``;
        ``smoke``: one small shape, few repeats (a test of the bench itself)."""
        everything = tuple(_step_table(None))
        steps = everything if full else DEFAULT_STEPS
        if only:
            wanted = [w if w in everything else f"{w}_step" for w in (w.strip() for w in only.split(",")) if w]
            unknown = [w for w in wanted if w not in everything]
            if unknown:
                raise UsageError(f"unknown bench step {unknown}: choose from {', '.join(everything)} "
                                 "(the _step suffix may be left out)")
            steps = tuple(wanted)
        if shape is not None and shape not in SHAPES:
            raise UsageError(f"unknown --shape {shape!r}: choose one of {list(SHAPES)}")
        shapes = (shape,) if shape else tuple(SHAPES)
        if smoke:
            return cls(steps, shapes[:1], repeats=3, batch=16, size=12)
        return cls(steps, shapes, scaling=full)


def _ratios(t: dict, mem: dict) -> dict:
    """The ratios of a shape's step times (and memory), where both steps were measured."""
    r = lambda a, b: t[a] / t[b] if a in t and b in t else None  # noqa: E731
    out = {
        "jm_over_kd": r("jm_step", "kd_step"),
        "library_over_handwritten": r("jm_step", "handwritten_step"),
        "jm_over_kd_cached": r("jm_step_cached", "kd_step_cached"),
        "folded_over_unfolded_jm": r("jm_step", "jm_step_unfolded"),
        "folded_over_unfolded_kd": r("kd_step", "kd_step_unfolded"),
        "teacher_channels_last_over_contiguous_jm": r("jm_step", "jm_step_teacher_contiguous"),
        "jm_over_kd_unfolded": r("jm_step_unfolded", "kd_step_unfolded"),
        "proj_over_top1": r("jm_proj_step", "jm_step"),
        "exact_all_over_top1": r("jm_exact_all_step", "jm_step"),
        "fd_over_kd": r("jm_fd_step", "kd_step"),
        "jvp_over_kd": r("jm_jvp_step", "kd_step"),
        "noisy_kd_m4_over_jm": r("noisy_kd_step_m4", "jm_step"),
        "naive_top1_over_jm": r("naive_top1_step", "jm_step"),
        "naive_all_over_exact_all": r("naive_all_step", "jm_exact_all_step"),
        "teacher_forward_over_student_forward": r("teacher_forward", "student_forward"),
        "channels_last_over_contiguous_ce": r("ce_step_channels_last", "ce_step"),
        "channels_last_over_contiguous_jm_cached": r("jm_step_cached_channels_last", "jm_step_cached"),
        # the Jacobian term's schedules (objective.jacobian_every k, jacobian_fraction ρ); "scheduled": the
        # recommended one, k (ρ's split passes over small batches pay the per-operation overhead twice on CPU)
        "fm_jm_over_fm": r("fm_jm_step", "fm_step"),
        "fm_jm_scheduled_over_fm": r("fm_jm_every_step", "fm_step"),
        "fm_jm_rho_over_fm": r("fm_jm_rho_step", "fm_step"),
        "jm_over_kd_cached_scheduled": r("jm_step_cached_every", "kd_step_cached"),
        "jm_over_kd_cached_rho": r("jm_step_cached_rho", "kd_step_cached"),
    }
    if mem.get("jm_step") and mem.get("kd_step"):
        out["jm_over_kd_memory"] = mem["jm_step"] / mem["kd_step"]
    return {k: v for k, v in out.items() if v is not None}


def run_bench(device_name: str = "cpu", plan: Plan | None = None) -> dict:
    """Times first (the normal allocator), scaling, then peak memory in a second pass:
    the fixed mmap threshold that makes CPU memory readable costs page faults (system
    time) on every large allocation, so no time is measured after it is set."""
    plan = plan or Plan()
    device = torch.device(device_name)
    results = {"device": device_name, "machine": machine_record(device), "batch": plan.batch, "repeats": plan.repeats,
               "steps": list(plan.steps), "shapes": {}}
    prepared = {}
    for name in plan.shapes:
        c, size, k, teacher, student = SHAPES[name]
        s = Setup(c, plan.size or size, k, teacher, student, plan.batch, device)
        table = _step_table(s)
        steps = {n: table[n]() for n in plan.steps if not (n == "naive_all_step" and k > 10)}  # k backward passes
        times = _interleaved_medians(steps, device, plan.repeats, k)
        for step_name, sec in times.items():
            print(f"  {name:<14}{step_name:<30}{1e3 * sec:9.1f} ms", flush=True)
        prepared[name] = steps
        results["shapes"][name] = {"channels": c, "size": plan.size or size, "classes": k, "teacher": teacher,
                                   "student": student, "seconds": times}
    if plan.scaling:
        results["scaling"] = _scaling(device, plan.repeats)
    results["malloc_fixed"] = _fix_malloc() if device.type == "cpu" else None
    for name, steps in prepared.items():
        memory = {}
        for step_name, step in steps.items():
            with torch.no_grad() if step_name.endswith("_forward") else contextlib.nullcontext():
                memory[step_name] = peak_memory(step, device)
        shape = results["shapes"][name]
        shape["peak_bytes"] = memory
        shape["ratios"] = _ratios(shape["seconds"], memory)
    return results


def _scaling(device, repeats) -> dict:
    """Step time against batch size, input size and number of classes."""
    out = {"batch": [], "size": [], "classes": []}
    base = {"batch": 128, "size": 28, "classes": 10}
    grid = {"batch": [32, 64, 128, 256], "size": [16, 28, 48], "classes": [10, 100, 400]}
    kinds = {"top1": {"jm_outputs": "teacher_top1"}, "projection": {"jm_outputs": "projection"},
             "exact_all": {"jm_outputs": "all"}}
    for axis, values in grid.items():
        for v in values:
            p = {**base, axis: v}
            s = Setup(1, p["size"], p["classes"], *SHAPES["mnist-like"][3:], p["batch"], device)
            row = {axis: v}
            for kind, extra in kinds.items():
                if kind == "exact_all" and p["classes"] > 100:
                    continue  # k vector-Jacobian products: the scaling is clear below this
                step = s.objective_step(alpha=1.0, beta=1.0, gamma=1.0, **extra)
                row[kind] = time_step(step, device, max(3, repeats // 2), warmup=1)
            out[axis].append(row)
            print(f"  scaling {axis}={v}: " + ", ".join(f"{k} {1e3 * t:.1f} ms" for k, t in row.items() if k != axis))
    return out


def run_profile(device_name: str = "cpu", batch: int = 128, calls: int = 3) -> dict:
    """torch.profiler's top operators (self time per step) of kd_step, jm_step and
    jm_step_cached on the mnist-like shape: where the Jacobian term's time goes."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device_name)
    c, size, k, teacher, student = SHAPES["mnist-like"]
    s = Setup(c, size, k, teacher, student, batch, device)
    kd = {"alpha": 1.0, "beta": 1.0}
    steps = {"kd_step": s.objective_step(**kd), "jm_step": s.objective_step(**kd, gamma=1.0),
             "jm_step_cached": s.objective_step(cached=True, **kd, gamma=1.0)}
    # The teacher's chunking trades time for memory: both variants timed in one run.
    chunks = {f"jm_step_teacher_chunk_{c}": s.objective_step(**kd, gamma=1.0, teacher_chunk=c) for c in (0, 32, 64)}
    chunk_times = _interleaved_medians({"kd_step": steps["kd_step"], **chunks}, device, 10, k)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {"device": device_name, "machine": machine_record(device), "batch": batch, "teacher": teacher,
           "student": student, "steps": {}, "chunk_seconds": chunk_times}
    for name, step in steps.items():
        step()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out["steps"][name] = {"self_ms_per_step": total / 1e3 / calls,
                              "top": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / calls,
                                       "calls_per_step": e.count / calls} for e in events[:8]]}
    out["vectorize_seconds"] = _vectorize_comparison(device)
    out["teacher_seconds"] = _teacher_paths(s, device)
    if device.type == "cpu":
        _fix_malloc()  # after every timing (see run_bench)
    out["chunk_peak_bytes"] = {name: peak_memory(step, device)
                               for name, step in {"kd_step": steps["kd_step"], **chunks}.items()}
    return out


def _teacher_paths(s: Setup, device) -> dict:
    """The teacher's forward and forward-plus-input-gradient (the Jacobian term's teacher
    side, top-1 row), as it is, BatchNorm folded, folded and channels-last, and folded and
    compiled with ``torch.compile`` (timed after its compilation)."""
    from ..core.fusion import fast_teacher, fold_batchnorm
    variants = {"as_is": s.teacher, "folded": fold_batchnorm(s.teacher, s.x[:8]),
                "folded_channels_last": fast_teacher(s.teacher, s.x[:8])}
    try:
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False  # input_jacobian keeps the graph for several rows
        variants["folded_compiled"] = torch.compile(fold_batchnorm(s.teacher, s.x[:8]))
    except Exception as exc:  # noqa: BLE001 - a platform without a compiler backend
        print(f"  torch.compile unavailable: {type(exc).__name__}")
    steps = {}
    for name, t in variants.items():
        def grad(t=t):
            x = s.x.clone().requires_grad_()
            z = t(x)
            J.input_jacobian(z, x, J.teacher_top1(z.detach()))
        steps[f"{name}_forward"] = lambda t=t: t(s.x)
        steps[f"{name}_input_gradient"] = grad
    try:
        return _interleaved_medians(steps, device, 10, s.classes)
    except Exception as exc:  # noqa: BLE001 - compilation fails at the first call on some platforms
        print(f"  torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
        return _interleaved_medians({k: v for k, v in steps.items() if "compiled" not in k}, device, 10, s.classes)


def _vectorize_comparison(device, batch: int = 32) -> dict:
    """All k rows of the student's Jacobian with create_graph and their double backward:
    one vmapped backward (is_grads_batched) against a loop of k backward passes."""
    out = {}
    for k in (10, 100):
        student = create_model("small_cnn_8", k, 3).to(device)
        x = torch.rand(batch, 3, 32, 32, device=device)
        index = torch.arange(k, device=device).expand(batch, k)
        for vectorize in (True, False):
            def step(x=x, student=student, index=index, vectorize=vectorize):
                xs = x.clone().requires_grad_()
                rows = J.input_jacobian(student(xs), xs, index, create_graph=True, vectorize=vectorize)
                rows.pow(2).sum().backward()
            out[f"k{k}_{'vmap' if vectorize else 'loop'}"] = time_step(step, device, repeats=2, warmup=1)
    return out


def main(json_path: str | None, device: str, plot_path: str | None = None, profile: bool = False,
         plan: Plan | None = None) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu")
    if profile:
        results = run_profile(device)
        _print_profile(results)
    else:
        start = time.time()
        results = run_bench(device, plan)
        results["bench_seconds"] = time.time() - start
        print(format_table(results))
        if plot_path and results.get("scaling"):
            plot_scaling(results, plot_path)
    if json_path:
        write_json_atomic(json_path, _finite(results))
    return results


def _print_profile(results: dict) -> None:
    print("all-k student rows: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in results["vectorize_seconds"].items()))
    print("teacher chunking: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in results["chunk_seconds"].items()))
    print("peak memory: " + ", ".join(f"{k} {(v or 0) / 2**20:.1f} MiB" for k, v in results["chunk_peak_bytes"].items()))
    for name, p in results["steps"].items():
        print(f"{name}: {p['self_ms_per_step']:.1f} ms of operator time per step")
        for e in p["top"]:
            print(f"  {e['op']:<48}{e['self_ms_per_step']:9.1f} ms  ({e['calls_per_step']:.0f} calls)")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
