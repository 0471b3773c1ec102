"""The README's snippet, run exactly as written."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- snippet:.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its snippet block"
    return match.group(1)


def test_readme_snippet_runs_and_trains_the_student():
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 10
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)).eval().requires_grad_(False)
    scope = {"x": torch.randn(5, 1, 4, 4), "y": torch.randint(0, 3, (5,)), "student": student, "teacher": teacher}
    exec(compile(code, str(README), "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
