"""``jacmatch experiment SECTION``: the sections by name, the propositions' and the
pictures' sections, and the command that runs one section or all of them."""

from __future__ import annotations

import time
from pathlib import Path

from ..experiments import rows as R
from ..errors import UsageError
from ..experiments.common import read_json, with_provenance, write_result
from .converge import converge_section
from .fidelity import fidelity_section
from ..experiments.figures import plot_gradients
from .protocol import FULL, QUICK, Layout, teacher_path, distill_section, run_config, teacher_section
from .robustness import robustness_section
from .schedules import schedules_section
from .transfer import transfer_section


def verify_section(lay: Layout) -> dict:
    from ..experiments.verify import main as verify_main
    start = time.time()
    records = verify_main(None, str(lay.out / "verify.png"), **lay.profile.verify)
    summary = {"records": records, "section_seconds": time.time() - start}
    write_result(lay.out / "verify.json", with_provenance(summary))
    return summary


def pictures_section(lay: Layout) -> dict:
    """Input-gradients of the teacher and of the n=10, seed-0 students (KD and KD + JM)."""
    import torch

    from ..core.jacobian import input_jacobian, teacher_top1
    from ..data import create_dataset
    from ..training import load_model
    runs, out = lay.runs, lay.out
    teacher, _ = load_model(teacher_path(lay))
    n = lay.profile.pictures_samples
    students = {R.CE_KD: runs / "distill" / f"CE_KD_n{n}_s0" / "last.pt",
                R.CE_KD_JM: runs / "distill" / f"CE_KD_JM_n{n}_s0" / "last.pt"}
    for path in students.values():  # a run known by its record only (a fresh clone): trained again, as recorded
        record = lay.record_of(path.parent)
        if not path.is_file() and record.is_file():
            lay.train(read_json(record)["config"], record=False)
    missing = [str(p) for p in students.values() if not p.is_file()]
    if missing:
        raise UsageError(f"{missing} missing: run `jacmatch experiment distill` first")
    models = {"teacher": teacher, **{k: load_model(p)[0] for k, p in students.items()}}
    data = create_dataset(run_config("distill", lay.profile)["data"]["name"])
    x, _ = data.test.batch(torch.arange(6))
    with torch.enable_grad():
        xt = x.clone().requires_grad_()
        index = teacher_top1(teacher(xt).detach())
        grads = {}
        for name, model in models.items():
            xi = x.clone().requires_grad_()
            grads[name] = input_jacobian(model.eval()(xi), xi, index).detach()
    plot_gradients(x, grads, n, out / "gradients.png")
    return {"figure": str(out / "gradients.png")}


SECTIONS = {"teacher": teacher_section, "distill": distill_section, "converge": converge_section,
            "schedules": schedules_section, "fidelity": fidelity_section, "robustness": robustness_section,
            "transfer": transfer_section, "verify": verify_section, "pictures": pictures_section}


def main(section: str, quick: bool = False, out: str | None = None, samples: list | None = None) -> None:
    """Run ``section`` (or ``all``), writing under ``out`` (default: the current folder);
    ``samples``: converge's part at these n only (:func:`converge_section`)."""
    lay = Layout(Path(out) if out else Path("."), QUICK if quick else FULL)
    names = list(SECTIONS) if section == "all" else [section]
    if any(n not in SECTIONS for n in names):
        raise UsageError(f"unknown section {section!r}: choose one of {list(SECTIONS) + ['all']}")
    if samples is not None and section != "converge":
        raise UsageError(f"--samples splits the converge section into parts; {section!r} runs whole")
    timings = {}
    for name in names:
        start = time.time()
        print(f"== {name}", flush=True)
        SECTIONS[name](lay, samples) if samples is not None else SECTIONS[name](lay)
        timings[name] = time.time() - start
        print(f"== {name} done in {timings[name]:.0f} s")
