"""The report's other sections: robustness to noisy inputs, transfer, the propositions;
the sections' times, and the check that a section's runs read one data set."""

from __future__ import annotations

from pathlib import Path

from ..experiments import rows as R
from ..errors import UsageError
from ..experiments.common import read_json, summarize
from ..experiments.figures import noise_sigmas
from ..paper.protocol import SECTION_MINUTES, transfer_classes
from ..experiments.report_text import check_flag, chosen_values, img, missing, paired, pm, signed, span

__all__ = ["robust_text", "budget_checks", "transfer_text", "verify_text", "section_time", "check_one_data_set",
           "load_product", "product_text", "schedules_text", "load_tune", "tune_text", "differs_from_recipe"]


def robust_text(r: dict | None, d: dict | None, folder: str) -> tuple[str, list[str]]:
    if r is None:
        return missing("jacmatch experiment robustness"), []
    sigmas = noise_sigmas(r)
    head = "| method | training set | σ=0 | " + " | ".join(f"σ={s}" for s in sigmas) + " |"
    lines = [f"σ_train = {r['sigma_train']}; {len(r['seeds'])} seeds; test accuracy (%) under Gaussian noise of "
             "standard deviation σ (units of the [0, 1] pixel range).", "", head, "|---|---|" + "---|" * (1 + len(sigmas))]
    for c in r["cells"].values():
        if "val_gain" not in c:
            lines.append(f"| {c['row']} | {c['training_set']} | {pm(c['acc'])} | "
                         + " | ".join(pm(c["noisy_acc"][s]) for s in sigmas) + " |")
    lines += budget_checks([c for c in r["cells"].values() if "val_gain" in c], "training_set",
                            [c for c in r["cells"].values() if "val_gain" not in c])
    findings = []  # the distilled students under noise are claim (c)'s verdict: said there, once
    if d is not None:
        ns = [n for n in d["samples"] if R.key(R.CE_KD_JM, n) in d["cells"]]
        lines += ["", "The students of section 2 under the same noise (σ = 0.3):", "",
                  "| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for row in (R.CE_KD, R.CE_KD_JM, R.KD, R.KD_JM):
            if all(R.key(row, n) in d["cells"] for n in ns):
                lines.append(f"| {row} | " + " | ".join(pm(d["cells"][R.key(row, n)]["noisy_acc"]["0.3"]) for n in ns) + " |")
        if ns:
            lines += ["", f"![students under noise]({img(folder, 'distill_noise')})"]
    full = {c["row"]: c for c in r["cells"].values() if c["training_set"] == "full" and "val_gain" not in c}
    for sigma in ("0.1", "0.5"):
        if full and sigma in sigmas:
            text = ", ".join(f"{row} {pm(c['noisy_acc'][sigma])}%" for row, c in full.items())
            if sigma == "0.1":
                text += " (clean: " + ", ".join(f"{row} {pm(c['acc'])}%" for row, c in full.items()) + ")"
            findings.append(f"Robustness (full training set, test noise σ = {sigma}): {text}.")
    return "\n".join(lines) + f"\n\n![robustness]({img(folder, 'robustness')})\n", findings


def budget_checks(cells: list[dict], where: str, rows: list[dict] = ()) -> list[str]:
    """The baselines at twice their budget: the change in validation and test accuracy; and
    the epochs every row trained for (``rows``), grown while a baseline still gained."""
    if not cells:
        return []
    lines = ["", "Budget check: the baselines trained for twice their epochs, against their own budget (points, "
             "means over seeds; a baseline that has converged gains under 0.5 of validation accuracy):", "",
             "| baseline | at | epochs | validation | test |", "|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['row']} | {c[where]} | {c['epochs']} | {signed(c['val_gain'])}{check_flag(c['val_gain'])} "
                     f"| {signed(c['test_gain'])} |")
    grown = {c[where]: c for c in rows if "grown_from" in c}  # the rows of one training set share their epochs
    if grown:
        lines += ["", "Every row of a training set trains for the epochs its baselines need: doubled while a "
                  "baseline gained 0.5 point of validation accuracy or more at twice them. " + "; ".join(
                      f"{at}: {c['epochs']} epochs" + (" (grown from " + ", ".join(
                          f"{e}, where the baselines gained " + ", ".join(f"{r} {signed(g)}" for r, g in gains.items())
                          for e, gains in zip(c["grown_from"], c["gains_grown_from"])) + ")" if c["grown_from"] else "")
                      for at, c in grown.items()) + "."]
    return lines


def transfer_text(t: dict | None) -> tuple[str, list[str]]:
    if t is None:
        return missing("jacmatch experiment transfer"), []
    ns = sorted({c["samples_per_class"] for c in t["cells"].values()})
    rows = list(dict.fromkeys(c["row"] for c in t["cells"].values()))
    chosen = chosen_values(t.get("selection", {}), (("delta", "δ (AT)"), ("delta_jacobian", "δ_J (AT Jacobians)")))
    source, target = (span(c) for c in transfer_classes())
    lines = [f"Source teacher (classes {source}): test accuracy {100 * t['source_teacher']['test']['acc']:.2f}%. "
             f"Target task: classes {target}; {len(t['seeds'])} seeds; test accuracy (%), mean ± std."
             + (f" Chosen on the validation split, in this order: {chosen}." if chosen else ""), "",
             "| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for r in rows:
        if not any("val_gain" in t["cells"].get(R.key(r, n), {}) for n in ns):
            lines.append(f"| {r} | " + " | ".join(pm(t["cells"][R.key(r, n)]["acc"]) for n in ns) + " |")
    lines += budget_checks([c for c in t["cells"].values() if "val_gain" in c], "samples_per_class",
                            [c for c in t["cells"].values() if "val_gain" not in c])
    findings = []
    for a, b, what in ((R.CE_SCRATCH, R.CE_AT, "attention transfer versus CE from scratch"),
                       (R.CE_AT, R.CE_AT_JM, "AT + Jacobians versus AT alone")):
        pairs = [(n, t["cells"].get(R.key(a, n)), t["cells"].get(R.key(b, n))) for n in ns]
        diffs = [f"n={n}: {paired(x['acc']['values'], y['acc']['values'])[1]}" for n, x, y in pairs if x and y]
        if diffs:
            findings.append(f"Transfer (Fashion-MNIST classes {source} → {target}), {what}: " + ", ".join(diffs)
                            + " points of test accuracy (paired by seed).")
    return "\n".join(lines) + "\n", findings


def verify_text(v: list | dict | None, folder: str) -> tuple[str, list[str]]:
    if v is None:
        return missing("jacmatch experiment verify"), []
    v = v["records"] if isinstance(v, dict) else v  # the section's JSON: records and provenance
    lines = ["| proposition | activation | form | slope | slope below kink |", "|---|---|---|---|---|"]
    for r in v:
        s = "—" if r["slope"] is None else f"{r['slope']:.2f}"
        k = "" if r.get("slope_below_kink") is None else f"{r['slope_below_kink']:.2f}"
        lines.append(f"| {r['proposition']} | {r['activation']} | {r['form']} | {s} | {k} |")
    smooth_full = [r["slope"] for r in v if r["activation"] != "relu" and r["form"] == "full" and r["slope"] is not None]
    short_ce = [r["slope"] for r in v if r["activation"] != "relu" and r["form"] == "short"
                and r["proposition"].endswith("ce") and r["slope"] is not None]
    findings = []
    if smooth_full and short_ce:
        findings.append(f"Propositions: on smooth networks the full forms' residuals fall like σ^{min(smooth_full):.2f}"
                        f"–σ^{max(smooth_full):.2f} and the short cross-entropy forms' like "
                        f"σ^{min(short_ce):.2f}–σ^{max(short_ce):.2f} (theory: 4 and 2).")
    return ("— means the residual never stood clear of Monte-Carlo noise (the form is exact there: "
            "ReLU networks on squared error, inside a linear region).\n\n" + "\n".join(lines)
            + f"\n\n![propositions]({img(folder, 'verify')})\n"), findings


def section_time(name: str, j: dict | None) -> str | None:
    """Training time summed over a section's runs (the teacher: its own training), which is
    what a rerun from scratch costs; and the wall time of the section's last invocation
    when it is about as long (a shorter one reused finished runs and says nothing)."""
    if j is None:
        return None
    runs = j.get("train_seconds" if name == "teacher" else "run_seconds", j.get("section_seconds"))
    wall = j.get("section_seconds")
    text = f"{runs / 60:.1f} min" + (f" (over the {SECTION_MINUTES}-minute budget)" if runs > 60 * SECTION_MINUTES else "")
    if wall is not None and name != "teacher" and wall >= 0.9 * runs:
        text += f"; its last invocation took {wall / 60:.1f} min of wall time"
    return text


def check_one_data_set(sections: dict) -> None:
    """Refuse a section whose runs read different data (its provenance lists several
    data hashes): its table would compare runs on different data."""
    for name, j in sections.items():
        hashes = ((j if isinstance(j, dict) else {}).get("provenance") or {}).get("data_sha256")
        if isinstance(hashes, list) and len(hashes) > 1:
            raise UsageError(f"{name}.json mixes runs on {len(hashes)} different data sets (data_sha256 "
                             f"{', '.join(h[:12] for h in hashes)}): rerun its runs on one copy of the data")


#: What the product's records are: the command a user types, with its default recipe.
PRODUCT_COMMAND = ("jacmatch distill --teacher results/teachers/fmnist_resnet20.pt --dataset fashion-mnist "
                   "--samples-per-class N --seed S")


def load_product(folder: Path) -> list[dict]:
    """The default command's run records (``results/product/default_n<N>_s<S>.json``)."""
    return [read_json(p) for p in sorted(folder.glob("default_n*_s*.json"))]


def product_text(records: list[dict], c: dict | None) -> str:
    """The product's default against the converged section: per n, the default command's test
    accuracy over its seeds beside §2b's best recipe row there, and whether it lies within that
    row's 95 % interval."""
    from ..training.recipes import RECIPES
    if not records:
        return "*No runs of the default command here: `bash results/product/run.sh` records them.*\n"
    by_n: dict[int, list[dict]] = {}
    for r in records:
        by_n.setdefault(int(r["config"]["data"]["samples_per_class"]), []).append(r)
    lines = [f"Each run is the command a user types, `{PRODUCT_COMMAND}`, with its default recipe (`auto`), run by "
             "`bash results/product/run.sh`; its records are in `results/product/`. Beside it, the best recipe row of "
             "§2b at that n (mean ± 95 % interval over 5 seeds).\n",
             "| n | `auto` chose | seeds | default command: test (%) | §2b's best row (%) | within its interval | "
             "training (min, mean) |", "|---|---|---|---|---|---|---|"]
    rows, notes = [r.row for r in RECIPES.values()], []
    for n, runs in sorted(by_n.items()):
        s = summarize([r["final"]["test"]["acc"] for r in runs])
        chosen = sorted({r.get("recipe", {}).get("name", "none") for r in runs})
        best, verdict = "—", "—"
        if c and all(f"{row}|{n}" in c["cells"] for row in rows):
            row = max(rows, key=lambda x: c["cells"][f"{x}|{n}"]["acc"]["mean"])
            a = c["cells"][f"{row}|{n}"]["acc"]
            best = f"{row}: {100 * a['mean']:.1f} ± {100 * a['ci95']:.1f}"
            lo, hi = a["mean"] - a["ci95"], a["mean"] + a["ci95"]
            verdict = "yes" if lo <= s["mean"] <= hi else ("above it" if s["mean"] > hi else "**below it**")
        minutes = sum(r["loop_seconds"] if "loop_seconds" in r else r["train_seconds"] for r in runs) / len(runs) / 60
        spread = f"± {100 * s['ci95']:.1f}" if len(runs) > 1 else "(one seed: no interval yet)"
        lines.append(f"| {n} | {', '.join(chosen)} | {len(runs)} of 5 | {100 * s['mean']:.1f} {spread} "
                     f"| {best} | {verdict} | {minutes:.1f} |")
        stale = sorted({d for r in runs if r.get("recipe") for d in differs_from_recipe(r["config"], r["recipe"]["name"])})
        if stale:
            notes.append(f"- n = {n}: recorded before the recipe changed ({'; '.join(stale)}): "
                         "`bash results/product/run.sh` trains it again.")
    if notes:
        lines += ["", "**Records older than today's recipes:**", *notes]
    return "\n".join(lines) + "\n"


def differs_from_recipe(config: dict, name: str) -> list[str]:
    """The settings recipe ``name`` gives that a run's recorded ``config`` does not hold (``key:
    recorded -> the recipe's``); a setting the record predates counts as the default it ran with."""
    from ..training.config import RunConfig, config_to_dict
    from ..training.recipes import recipe_values
    defaults = config_to_dict(RunConfig())

    def leaves(values: dict, prefix: str = ""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    def lookup(values, key: str):
        for part in key.split("."):
            values = values[part] if isinstance(values, dict) and part in values else None
        return values

    def recorded(key: str):
        value = lookup(config, key)
        return lookup(defaults, key) if value is None else value
    return [f"{key}: {recorded(key)} -> {value}" for key, value in leaves(recipe_values(name)) if recorded(key) != value]


def load_tune(folder: Path) -> dict | None:
    """The tune study's summary (``results/tune/tune.json``) and its best values' seeds
    (``best_s<S>.json``); None where the study has not run."""
    if not (folder / "tune.json").is_file():
        return None
    return {"summary": read_json(folder / "tune.json"),
            "seeds": [read_json(p) for p in sorted(folder.glob("best_s*.json"))]}


#: The study's command (results/tune/run.sh)
TUNE_COMMAND = ("jacmatch tune --recipe fm+jm --teacher results/teachers/fmnist_resnet20.pt --dataset fashion-mnist "
                "--samples-per-class 10 --trials 24")


def tune_text(t: dict | None, c: dict | None, d: dict | None = None) -> str:
    """`jacmatch tune` on FM+JM at n = 10: the study (trials, the best values, its time against
    the converged section's hand grids for FM's values) and the best values trained with 5
    seeds against the hand grid's FM+JM cell (its mean minus its 95 % interval, the target)."""
    if t is None:
        return "*The tune study has not run: `bash results/tune/run.sh` runs it.*\n"
    s = t["summary"]
    best = s.get("best")
    lines = [f"Run by `bash results/tune/run.sh` (`{TUNE_COMMAND}`, overrides in the script): Optuna's TPE sampler "
             "and median pruner on the validation split, a trial pruned only after its run's early-stopping patience "
             "in evaluations; the study is `results/tune/fmjm_n10.db`, its trials `results/tune/trials.csv`, its "
             "history `results/tune/history.png`.\n",
             "| trials (complete, pruned, failed) | best validation (%) | its values | study time (h) | "
             "hand grids' time (h) |", "|---|---|---|---|---|"]
    grids = (c or {}).get("fm", {}).get("selection", {})
    grid_hours = sum(g["train_seconds"] for g in grids.values()) / 3600
    values = ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in best["params"].items()) if best else "—"
    lines.append(f"| {s['complete'] + s['pruned']} ({s['complete']}, {s['pruned']}, {s['failed']}) | "
                 + (f"{100 * best['val_acc']:.1f}" if best else "—") + f" | {values} | "
                 + (f"{s['trial_seconds'] / 3600:.2f}" if "trial_seconds" in s else "—") + " | "
                 + (f"{grid_hours:.2f} ({', '.join(grids)} at n = "
                    f"{next(iter(grids.values()))['samples_per_class']}, 2 seeds each)" if grids else "—") + " |")
    gamma = ((d or {}).get("selection") or {}).get("gamma", {}).get("train_seconds")
    lines.append("\nStudy time: the workers' time on its complete and pruned trials. The hand grids chose FM's values "
                 "(§2b); FM+JM takes them with γ from the distillation section's grid"
                 + (f", which took {gamma / 3600:.2f} h more at its short budgets" if gamma else "") + ".\n")
    seeds = t["seeds"]
    cell = (c or {}).get("cells", {}).get("FM+JM|10")
    if not seeds:
        lines.append("*The best values' seeds have not run yet.*")
    else:
        acc = summarize([r["final"]["test"]["acc"] for r in seeds])
        lines.append(f"The best values trained with seeds {', '.join(str(r['config']['seed']) for r in seeds)} "
                     "(`jacmatch distill --config results/tune/best.yaml --seed S`):\n")
        lines += ["| seeds | test (%) | hand grid's FM+JM at n = 10 (%) | target: its mean minus its interval | "
                  "reached |", "|---|---|---|---|---|"]
        if cell:
            target = cell["acc"]["mean"] - cell["acc"]["ci95"]
            shown = _ci(acc) if len(seeds) > 1 else f"{100 * acc['mean']:.1f}"
            lines.append(f"| {len(seeds)} of 5 | {shown} | "
                         f"{_ci(cell['acc'])} | {100 * target:.1f} | "
                         f"{'yes' if acc['mean'] >= target else '**no**'} |")
        budget = {"eval.patience", "optim.max_steps"}  # what the study does not search, but the recipe sets
        changed = sorted({d for r in seeds for d in differs_from_recipe(r["config"], "fm+jm")
                          if d.split(":")[0] in budget})
        if changed:
            lines.append(f"\nThe study and its seeds trained with the recipe of their day: {'; '.join(changed)} in "
                         "today's `fm+jm` (the hand grid's cell trained with today's).")
    return "\n".join(lines) + "\n"


def _ci(s: dict, scale: float = 100.0) -> str:
    return f"{scale * s['mean']:.1f} ± {scale * s['ci95']:.1f}"


def _seconds(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def schedules_text(s: dict | None) -> str:
    """The Jacobian term on every k-th step against the full term (schedules.json): the k
    validation chose, and per row and n the test accuracy and fidelity paired by seed, the
    step's cost and the times, and the verdict."""
    if s is None:
        return missing("jacmatch experiment schedules")
    sel = s["selection"]
    scores = ", ".join(f"k = {v}: {100 * a:.1f}" for v, a in sel["val_acc"].items())
    lines = [f"The Jacobian term taken on every k-th step, multiplied by k (`objective.jacobian_every`, an unbiased "
             f"estimate), its rows trained exactly as their full rows in §2b (the same values, views and patience) with "
             f"{len(s['seeds'])} seeds. k = {s['every']} was chosen on validation for "
             f"{s['selection'].get('row', 'FM+JM')} at n = "
             f"{sel['samples_per_class']} ({sel['rule']}; mean validation accuracy (%) {scores}"
             f"{'' if sel['inside'] else '; at the high edge of its grid'}). Δ: the scheduled row minus the full row, "
             "seed by seed (mean ± 95 % interval, points); times are steps times each row's step cost measured in the "
             "section, back to back.\n",
             "| row | n | test (%) | full row (%) | Δ test | within the full row's interval | Δ agreement | "
             "step (ms): scheduled, full | to own best (s): scheduled, full | to CE+KD's accuracy (s): scheduled, full, "
             "CE+KD | to FM's accuracy (s): scheduled, full, FM | ÷ FM's own time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in s["comparisons"].items():
        row, n = R.split_key(key)
        full = s["rows"][row]
        st, to = c["step_seconds"], c["to_target"]

        def reached(names: tuple, target: str, to: dict = to) -> str:
            return ", ".join("—" if not (t := to[f"{name} to {target}"])["seconds"] else
                             f"{_seconds(t['seconds']['mean'])} ({t['reached']}/{t['seeds']})" for name in names)
        d = c["acc_difference"]
        lines.append(f"| {row} | {n} | {_ci(c['acc'])} | {_ci(c['full_acc'])} | {signed(100 * d['mean'])} ± "
                     f"{100 * d['ci95']:.1f} | {'yes' if c['within_full_interval'] else '**no**'} | "
                     f"{signed(100 * c['fidelity_difference']['agreement']['mean'])} | {1e3 * st[row]:.1f}, "
                     f"{1e3 * st[full]:.1f} | {_seconds(c['best_seconds'][row]['mean'])}, "
                     f"{_seconds(c['best_seconds'][full]['mean'])} | {reached((row, full, R.CE_KD), R.CE_KD)} | "
                     f"{reached((row, full, R.FM), R.FM)} | "
                     + ("—" if c["time_to_fm_over_fm"] is None else f"{c['time_to_fm_over_fm']:.2f}") + " |")
    def over_fm(c: dict) -> str:
        if c["time_to_fm_over_fm"] is not None:
            return f"{c['time_to_fm_over_fm']:.2f}"
        full = c["to_target"][f"{R.FM_JM} to {R.FM}"]["reached"]
        return "no seed reaches it" + (", nor of the full row" if not full else f" ({full} of the full row's do)")
    fm_rows = {R.split_key(k)[1]: c for k, c in s["comparisons"].items() if R.split_key(k)[0] == R.FM_JM_SCHEDULED}
    if fm_rows:
        lines.append("\nFM+JM (every k)'s time to FM's converged validation accuracy over FM's own time to it: "
                     + "; ".join(f"n = {n}: {over_fm(c)}" for n, c in fm_rows.items()) + ".")
    if s.get("complete"):
        for row, holds in s["verdict"].items():
            lines.append(f"\n**{row}**: " + ("within the full row's 95 % interval at every n measured: the recipes may "
                                              "take the schedule." if holds else
                                              "outside the full row's 95 % interval at some n: the full term stays the "
                                              "recipes' default; the Δ column is what the schedule costs."))
    else:
        lines.append("\n*The section is not complete: the verdict waits for every n.*")
    return "\n".join(lines) + "\n"
