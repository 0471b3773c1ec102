"""Can a model be a student (or a teacher) under Jacobian matching?

A student's Jacobian term is back-propagated to its parameters: a double backward, which
every operation of the student must support. ``aten::hardsigmoid_backward`` (MobileNetV3's
squeeze-excitation) has no derivative, for example. A teacher needs only first-order input
gradients. :func:`check_model` runs one KD + JM step each way on a tiny batch and, when the
student's step fails, names the first module whose backward has no derivative.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..core.jacobian import first_failing_module
from ..core.objective import ObjectiveConfig, TransferObjective
from ..models import create_model, dry_forward, input_side
from .config import ConfigError

__all__ = ["CheckResult", "check_model", "first_failing_module"]


@dataclass
class CheckResult:
    spec: str
    input_shape: tuple[int, ...]
    parameters: int = 0
    student_ok: bool = False
    teacher_ok: bool = False
    student_error: str | None = None
    teacher_error: str | None = None
    failing_module: str | None = None     # first module whose backward has no derivative
    student_step_seconds: float | None = None
    teacher_step_seconds: float | None = None
    fix: str | None = None                # the model settings that make it work, when some do
    fixed_max_abs_diff: float | None = None  # outputs with the fix against without
    replaced: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"


def _step(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor) -> float:
    """A KD + JM (teacher top-1, normalized) step with its backward, twice; the seconds of
    the second (the first pays for one-time allocations)."""
    objective = TransferObjective(student, teacher, ObjectiveConfig(alpha=1, beta=1, gamma=1, temperature=4))
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        _, total, _ = objective(x, y)
        total.backward()
        seconds = time.perf_counter() - start
    student.zero_grad(set_to_none=True)
    return seconds


def check_model(spec: str, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, *,
                fix: bool = False, batch: int = 2, **options) -> CheckResult:
    """One KD + JM step with ``spec`` as the student (a small CNN teaching), and one with
    it as the teacher (a small CNN learning). ``fix``: also try with Hardsigmoid and
    Hardswish replaced, and measure that the outputs do not change."""
    result = CheckResult(spec, tuple(input_shape))
    torch.manual_seed(0)
    x = torch.rand(batch, *input_shape)
    y = torch.randint(0, num_classes, (batch,))
    partner = create_model("small_cnn_4", num_classes, input_shape[0])
    model = create_model(spec, num_classes, input_shape[0], **options)
    _check_takes(model, spec, tuple(input_shape))
    result.parameters = sum(p.numel() for p in model.parameters())
    try:
        result.teacher_step_seconds = _step(partner, model, x, y)
        result.teacher_ok = True
    except (RuntimeError, ValueError) as exc:
        result.teacher_error = _error(exc)
    model.train()
    try:
        result.student_step_seconds = _step(model, partner, x, y)
        result.student_ok = True
    except (RuntimeError, ValueError) as exc:
        result.student_error = _error(exc)
        model.zero_grad(set_to_none=True)
        result.failing_module = first_failing_module(model.eval(), x)
    if not result.student_ok and fix:
        _try_fix(result, spec, input_shape, num_classes, x, y, partner, **options)
    return result


def _check_takes(model, spec: str, shape: tuple[int, ...]) -> None:
    """A model that cannot take ``shape`` at all is the user's input to fix, not a finding:
    one line with the shape to pass."""
    if dry_forward(model, shape) is not None:
        return
    c = shape[0]
    side, only = input_side(model, c)
    hint = (f"it takes no {c}-channel square input of the usual sizes" if side is None else
            f"it takes {c}x{side}x{side} only: pass --input-shape {c}x{side}x{side}" if only else
            f"its smallest input is {c}x{side}x{side}: pass --input-shape {c}x{side}x{side}")
    raise ConfigError(f"{spec} cannot take an input of shape {'x'.join(map(str, shape))}: {hint}")


def _fixes_for(error: str, replaced: bool) -> dict:
    """The model options that address a student's failure."""
    fixes = {}
    if replaced or "hardsigmoid" in error:
        fixes["replace_hard_activations"] = True
    if "scaled_dot_product" in error or "attention" in error:
        fixes["math_attention"] = True
    return fixes


def _try_fix(result: CheckResult, spec, input_shape, num_classes, x, y, partner, **options) -> None:
    torch.manual_seed(0)
    plain = create_model(spec, num_classes, input_shape[0], **options).eval()
    torch.manual_seed(0)
    probe = create_model(spec, num_classes, input_shape[0], replace_hard_activations=True, **options)
    result.replaced = [n for n, m in probe.named_modules() if type(m).__name__ in ("_Hardsigmoid", "_Hardswish")]
    fixes = _fixes_for(result.student_error or "", bool(result.replaced))
    if not fixes:
        return
    torch.manual_seed(0)
    fixed = create_model(spec, num_classes, input_shape[0], **fixes, **options).eval()
    with torch.no_grad():
        result.fixed_max_abs_diff = float((plain(x) - fixed(x)).abs().max())
    try:
        result.student_step_seconds = _step(fixed.train(), partner, x, y)
        result.fix = ", ".join(f"model.{k}=true" for k in fixes)
    except (RuntimeError, ValueError) as exc:
        result.student_error += f"; with {', '.join(fixes)}: {_error(exc)}"


def describe(result: CheckResult) -> list[str]:
    """The check's outcome in a few lines, with the fix to apply."""
    shape = "x".join(map(str, result.input_shape))
    lines = [f"{result.spec} ({result.parameters:,} parameters, input {shape})"]
    if result.teacher_ok:
        lines.append(f"  as a teacher: ok ({1e3 * result.teacher_step_seconds:.0f} ms for a KD+JM step)")
    else:
        lines.append(f"  as a teacher: fails: {result.teacher_error}")
    if result.student_ok:
        lines.append(f"  as a student: ok, twice differentiable ({1e3 * result.student_step_seconds:.0f} ms)")
        return lines
    where = f" at module {result.failing_module}" if result.failing_module else ""
    lines.append(f"  as a student: not twice differentiable{where}: {result.student_error}")
    if result.fix:
        sets = " ".join(f"--set {f}" for f in result.fix.split(", "))
        replaced = f", replacing {len(result.replaced)} modules" if result.replaced else ""
        lines.append(f"  fix: {sets}{replaced} (outputs differ by {result.fixed_max_abs_diff:.1e}); with it the "
                     f"step works ({1e3 * result.student_step_seconds:.0f} ms)")
    elif result.failing_module and not result.replaced:
        lines.append("  fix: replace that module by a twice-differentiable equivalent, or use this model as a "
                     "teacher only")
    else:
        lines.append("  fix: try --fix (replaces Hardsigmoid/Hardswish, math attention kernel); otherwise use it "
                     "as a teacher only")
    return lines
