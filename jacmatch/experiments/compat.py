"""``jacmatch compat``: docs/compatibility.md, which torchvision and timm models work as a
student (twice differentiable) and as a teacher under Jacobian matching.

Each model is checked by ``jacmatch check-model --fix`` in its own process (so that one
model's memory or time cannot stop the table), first at 3×64×64 and, when it cannot
take that size, at 3×224×224. Needs ``jacmatch[vision]``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._extras import require
from ..atomic import write_atomic, write_json_atomic

#: One or two models of each timm family that torchvision does not cover.
TIMM_MODELS = ("resnet10t", "efficientnet_b0", "mobilenetv3_small_100", "lcnet_050", "ghostnet_100",
               "rexnet_100", "regnetx_002", "convnext_atto", "cspresnet50", "densenet121", "dla34",
               "hrnet_w18_small", "mixnet_s", "repvgg_a0", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
               "levit_128s", "mobilevit_xxs", "efficientformer_l1", "poolformer_s12", "coat_lite_tiny",
               "edgenext_xx_small", "fastvit_t8", "tinynet_e")
SIZES = ("3x64x64", "3x224x224", "3x299x299")  # 299: Inception's auxiliary head in train mode


def _specs() -> list[str]:
    tv = require("torchvision", "vision")
    timm = require("timm", "vision")
    names = tv.models.list_models(module=tv.models)
    return [f"torchvision:{n}" for n in names] + [f"timm:{n}" for n in TIMM_MODELS if timm.is_model(n)]


def _check(spec: str, size: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        start = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "jacmatch", "check-model", spec, "--input-shape", size,
                                "--fix", "--json", str(path)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"spec": spec, "input_shape": size, "error": f"over {timeout:.0f} s"}
        if path.is_file():
            return json.loads(path.read_text())
        lines = (r.stderr or r.stdout).strip().splitlines()
        return {"spec": spec, "input_shape": size, "error": (lines[-1] if lines else f"exit {r.returncode}")[:200],
                "seconds": time.time() - start}


def _size_error(r: dict) -> bool:
    """Whether a check failed because the model cannot take the input's size."""
    text = " ".join(str(r.get(k) or "") for k in ("error", "teacher_error", "student_error")).lower()
    return "error" in r and any(w in text for w in ("size", "height", "width", "shape", "expected"))


def _row(r: dict) -> str:
    def ms(s):
        return f"{1e3 * s:.0f}" if s is not None else "–"
    shape = r["input_shape"] if isinstance(r["input_shape"], str) else "x".join(map(str, r["input_shape"]))
    if "error" in r:
        return f"| `{r['spec']}` | {shape} | – | – | – | – | {r['error'].replace('|', '/')} |"
    student = "yes" if r["student_ok"] else ("with fix" if r["fix"] else "no")
    fix = (", ".join(f"`{f}`" for f in r["fix"].split(", ")) +
           f" (outputs within {r['fixed_max_abs_diff']:.0e})") if r["fix"] else ""
    if not r["student_ok"] and not r["fix"]:
        where = f"{r['failing_module']}: " if r.get("failing_module") else ""
        fix = f"{where}{(r.get('student_error') or '')[:120]}".replace("|", "/")
    teacher = "yes" if r["teacher_ok"] else f"no: {(r.get('teacher_error') or '')[:80]}".replace("|", "/")
    return (f"| `{r['spec']}` | {shape} | {r['parameters'] / 1e6:.1f} | {student} | {teacher} | "
            f"{ms(r['student_step_seconds'])} / {ms(r['teacher_step_seconds'])} | {fix} |")


def main(out: str = "docs/compatibility.md", json_path: str | None = None, only: list[str] | None = None,
         timeout: float = 120.0) -> list[dict]:
    tv, timm = require("torchvision", "vision"), require("timm", "vision")
    specs = only or _specs()
    earlier = {}
    if only and json_path and Path(json_path).is_file():  # update these rows of an earlier table
        earlier = {r["spec"]: r for r in json.loads(Path(json_path).read_text())["records"]}
    records = []
    start = time.time()
    for i, spec in enumerate(specs):
        r = _check(spec, SIZES[0], timeout)
        for size in SIZES[1:]:  # a larger input where the model cannot take the smaller one
            if "error" not in r and (r.get("student_ok") or r.get("fix")):
                break
            bigger = _check(spec, size, timeout)
            if _size_error(r) or ("error" not in bigger and (bigger["student_ok"] or bigger["fix"]
                                                             or not r.get("teacher_ok"))):
                r = bigger  # the size the model is made for says more, even when it fails too
        records.append(r)
        print(f"[{i + 1}/{len(specs)}] {_row(r)}  [{time.time() - start:.0f} s]", flush=True)
    if earlier:
        fresh = {r["spec"]: r for r in records}
        records = [fresh.get(spec, r) for spec, r in earlier.items()]
    works = sum(1 for r in records if r.get("student_ok"))
    fixed = sum(1 for r in records if r.get("fix"))
    lines = [
        "# Model compatibility", "",
        f"Generated by `jacmatch compat` (`make compat`) with torch {torch.__version__}, torchvision "
        f"{tv.__version__}, timm {timm.__version__}, on {platform.machine()} CPU ({torch.get_num_threads()} threads). "
        "Each model, with random weights and 10 classes, takes one KD + JM step (teacher top-1, normalized) on a "
        "batch of 2: as the student (its double backward) against a small CNN teacher, and as the teacher "
        "against a small CNN student. The input is 3×64×64, or the next of 3×224×224 and 3×299×299 where the model "
        "cannot take the smaller one. "
        "Step times are of the second of two steps on this CPU, in ms, forward and backward, measured while "
        "other work shared the machine: read them as orders of magnitude.", "",
        f"{works} of {len(records)} models work as students as they are; {fixed} more work with the fix in the "
        "last column: `model.replace_hard_activations=true` replaces Hardsigmoid/Hardswish by modules with the "
        "same outputs and a double backward. Attention students (ViTs) work as they are: the objective runs "
        "their attention on PyTorch's math kernel, whose backward has a derivative (the fused kernels' have "
        "none), whenever a term back-propagates through the student's input gradient. "
        "`jacmatch check-model SPEC --fix` shows the fix, with the largest change in the outputs.", "",
        "| model | input | parameters (M) | student | teacher | step ms (student / teacher) | fix or failure |",
        "|---|---|---|---|---|---|---|",
        *(_row(r) for r in records), ""]
    write_atomic(out, lambda f: f.write("\n".join(lines)))
    if json_path:
        write_json_atomic(json_path, {"torch": torch.__version__, "torchvision": tv.__version__,
                                      "timm": timm.__version__, "records": records})
    return records
