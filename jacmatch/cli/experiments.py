"""The commands that run experiments, benchmarks and the report (``jacmatch verify``,
``demo``, ``experiment``, ``report``, ``compat``, ``bench``, ``estimators``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import non_negative_int, positive_float, positive_int

__all__ = ["add_experiment_commands", "add_measurement_commands"]


def _verify(a):
    from ..experiments.verify import main
    sizes = {"num_sigmas": 5, "num_draws": 100_000} if a.quick else {}
    main(a.json, a.plot, a.seed, **sizes)


def _demo(a):
    from ..experiments.demo import main
    main(a.dataset, a.out, a.seeds, a.device)


def _spare(a, *reads: tuple[str, Path]) -> None:
    """--json and --plot never write over a file the command reads (before anything is written)."""
    from ..training.run_folder import check_spared
    check_spared([(f"--{k}", Path(getattr(a, k)), False) for k in ("json", "plot") if getattr(a, k, None)], list(reads))


def _bench(a):
    if a.only == "data":
        from ..bench.data import TEACHER
        from ..bench.data import main as data_main
        _spare(a, ("the committed teacher", TEACHER))
        data_main(a.json, quick=a.quick)
        return
    from ..bench.speed import Plan, main
    main(a.json, a.device, a.plot, a.profile, Plan.choose(a.only, a.full, a.shape, smoke=a.quick))


def _estimators(a):
    from ..bench.estimators import TEACHER, main
    _spare(a, ("the committed teacher", TEACHER))
    main(a.json, a.samples, a.draws, a.seed)


def _experiment(a):
    from ..paper.sections import main
    main(a.section, a.quick, a.out, a.samples)


def _report(a):
    from ..report.document import main
    main(a.results)


def _compat(a):
    from ..experiments.compat import main
    main(a.out, a.json, a.only, a.timeout)


def _result_files(p: argparse.ArgumentParser, records: str, figure: str) -> None:
    """--json PATH and --plot PATH: where a command writes its results and their figure."""
    p.add_argument("--json", metavar="PATH", help=f"write {records} as JSON")
    p.add_argument("--plot", metavar="PATH", help=f"write {figure}")


def add_experiment_commands(sub) -> None:
    p = sub.add_parser("verify", help="check Propositions 1 and 2 numerically (docs/method.md)",
                       description="Monte-Carlo noisy losses against the closed forms of the propositions, "
                                   "over a sweep of σ, for smooth and ReLU networks.")
    p.add_argument("--quick", action="store_true", help="fewer σ and draws (under a minute)")
    _result_files(p, "the records", "a log-log PNG, one panel per proposition")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the networks and the draws")
    p.set_defaults(run=_verify)

    p = sub.add_parser("demo", help="the main job: teacher, students with CE / KD / KD+JM, table and plot",
                       description="Train a teacher, distil students with CE, KD and KD+JM at 1, 5 and 10 "
                                   "samples per class over 3 seeds; print a table, write JSON and a PNG.")
    p.add_argument("--dataset", default="digits", help="digits (default, bundled) or fashion-mnist")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per cell (default 3)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where to train")
    p.set_defaults(run=_demo)

    p = sub.add_parser("experiment", help="run a section of the paper's experiments (Fashion-MNIST)",
                       description="Sections: teacher, distill, converge (distillation at convergence), "
                                   "schedules (the Jacobian term on a fraction of each batch, against the full term), "
                                   "fidelity (the converged students' agreement with their teacher, from their kept "
                                   "weights), robustness, transfer, verify, pictures, or all. Finished runs are reused (from "
                                   "runs/ or their committed records) and interrupted ones resumed; each section "
                                   "writes results/paper/SECTION.json under --out.")
    p.add_argument("section", choices=["teacher", "distill", "converge", "schedules", "fidelity", "robustness",
                                       "transfer", "verify", "pictures", "all"],
                   help="which section to run")
    p.add_argument("--quick", action="store_true", help="a smoke run on digits with tiny grids")
    p.add_argument("--out", metavar="DIR", help="where runs/ and results/ are written (default: this folder)")
    p.add_argument("--samples", metavar="N", type=positive_int, nargs="+",
                   help="converge only: train the cells at these samples per class, a part beside parts at other n "
                        "(one process each, e.g. one per core); writes records, not converge.json, which the section "
                        "without --samples writes from them")
    p.set_defaults(run=_experiment)

    p = sub.add_parser("report", help="write results/REPORT.md, its plots and BENCHMARKS.md from the result JSONs",
                       description="Generate the report, the README's findings and BENCHMARKS.md from results/.")
    p.add_argument("--results", metavar="DIR", help="folder of the section JSONs (default results/paper)")
    p.set_defaults(run=_report)

    p = sub.add_parser("compat", help="write docs/compatibility.md: torchvision and timm models as students/teachers",
                       description="check-model over every torchvision classification model and a set of timm "
                                   "families (needs jacmatch[vision]).")
    p.add_argument("--out", metavar="PATH", default="docs/compatibility.md", help="the markdown table")
    p.add_argument("--json", metavar="PATH", help="also the records as JSON")
    p.add_argument("--only", metavar="SPEC", nargs="*",
                   help="check only these specs (with --json of an earlier table: update their rows)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per model before it is recorded as too slow")
    p.set_defaults(run=_compat)


def add_measurement_commands(sub) -> None:
    p = sub.add_parser("bench", help="cost of the Jacobian terms against KD (ratios in one run)",
                       description="Median step times and peak memory of CE, KD, KD+JM and the estimators, "
                                   "with and without the teacher cache; ratios measured in one run.")
    _result_files(p, "the measurements", "a PNG of step time against batch, input size and classes")
    p.add_argument("--only", metavar="STEPS", help="only these steps, comma-separated (kd,jm,jm_proj,...); "
                                                    "data: the cost of reading a folder or memmap instead")
    p.add_argument("--full", action="store_true", help="every step and the scaling sweep (slow)")
    p.add_argument("--shape", choices=["mnist-like", "cifar100-like"], help="only this shape")
    p.add_argument("--quick", action="store_true", help="few steps, small shapes (a smoke test)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to measure")
    p.add_argument("--profile", action="store_true",
                   help="only profile kd_step, jm_step and jm_step_cached (torch.profiler's top operators)")
    p.set_defaults(run=_bench)

    p = sub.add_parser("estimators", help="variance of the output projections and error of finite differences",
                       description="Measures what the random estimators' defaults are chosen from: each projection "
                                   "kind's bias and variance against the exact Frobenius norm, and the finite "
                                   "difference's error against forward-mode J·u over a range of steps.")
    p.add_argument("--json", metavar="PATH", help="write the measurements as JSON")
    p.add_argument("--samples", type=positive_int, default=32, help="samples (default 32)")
    p.add_argument("--draws", type=positive_int, default=4000, help="draws per projection kind (default 4000)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the student and the draws")
    p.set_defaults(run=_estimators)
