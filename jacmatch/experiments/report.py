"""``jacmatch report``: results/REPORT.md, its plots, BENCHMARKS.md and the README's
findings, all generated from the JSON files the experiments wrote. No number is typed
by hand; a section whose JSON is missing says so and names the command that makes it.

:func:`render_report` is pure (section JSONs in, markdown and findings out); the figures
are drawn by :mod:`.figures` and BENCHMARKS.md is written by :mod:`.bench`. Row names and
test-noise σ come from the section JSONs.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..atomic import write_atomic
from ..errors import UsageError
from .bench_report import write_benchmarks
from .common import CONVERGED_GAIN, converged, load_json
from .figures import draw_report_figures, main_rows, noise_sigmas

RESULTS = Path("results")
SECTIONS = ("teacher", "distill", "robustness", "transfer", "verify", "converge")


def _chosen(sel: dict, labels: tuple[tuple[str, str], ...]) -> str:
    """The values chosen on validation, in order, each with its validation scores, and
    whether the choice lies inside its grid (grown past an edge that won, when it did)."""
    def where(s: dict) -> str:
        if "inside" not in s:
            return ""
        grown = f"; grid grown past its edge to {', '.join(f'{v:g}' for v in s['extended'])}" if s["extended"] else ""
        if s["inside"]:
            return grown
        if s["extended"] and s["chosen"] == min(s["grid"]) and len(s["grid"]) > 1:
            return grown + "; **still at its low edge: the weight goes to 0, a natural bound (the term does not help " \
                           "on validation)**"
        return grown + "; **at the edge of its grid**"
    return "; ".join(f"{label} = {sel[key]['chosen']:g} (validation accuracy at n = {sel[key]['samples_per_class']}, "
                     f"seeds {sel[key]['seeds']}: "
                     + ", ".join(f"{float(k):g}: {100 * v:.1f}%" for k, v in sel[key]["val_acc"].items())
                     + where(sel[key]) + ")" for key, label in labels if key in sel)


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _img(folder: str, name: str) -> str:
    """A plot's link, relative to the report (written beside the results folder)."""
    return f"{folder}/{name}.png"


def _missing(command: str) -> str:
    return f"*Not run yet: `{command}` writes this section's JSON.*\n"


# ---- sections of the report -------------------------------------------------------------------


def _teacher(t: dict | None) -> str:
    if t is None:
        return _missing("jacmatch experiment teacher")
    noisy = ", ".join(f"σ={s}: {100 * a:.1f}%" for s, a in t["test"].get("noisy_acc", {}).items())
    return (f"A {t['model']} ({t['parameters']:,} parameters) trained on the full training set "
            f"(54,000 images; 6,000 held out for validation) for {t['epochs']} epochs: **test accuracy "
            f"{100 * t['test']['acc']:.2f}%** (validation {100 * t['val']['acc']:.2f}%), trained in "
            f"{t['train_seconds'] / 60:.1f} min. Checkpoint: `{t['checkpoint']}`. Under Gaussian input noise "
            f"(trained without noise): {noisy}.{_teacher_check(t)}\n")


def _teacher_check(t: dict) -> str:
    c = t.get("check")
    if c is None:
        return ""
    commit = (t.get("provenance") or {}).get("git_commit") or "an installed package"
    same = "every accuracy above came out identical" if c["reproduced"] else \
        f"**it differs from the record**: test {100 * c['test']['acc']:.2f}%, validation {100 * c['val']['acc']:.2f}%"
    return (f" Re-evaluated from the committed checkpoint (SHA-256 {c['checkpoint_sha256'][:12]}…) by "
            f"`jacmatch experiment teacher` at commit {commit[:12]}: {same}.")


def _teacher_findings(t: dict | None) -> list[str]:
    if t is None:
        return []
    noisy = t["test"].get("noisy_acc", {})
    worst = f"; under input noise of σ = 0.1 it falls to {100 * noisy['0.1']:.1f}%" if "0.1" in noisy else ""
    return [f"Teacher: {t['model']} reaches {100 * t['test']['acc']:.2f}% test accuracy on Fashion-MNIST{worst}."]


def _table(cells: dict, rows: list[str], ns: list, value) -> list[str]:
    """A markdown table of ``value(cell)`` per row and n ("—" where a cell has not run)."""
    lines = ["| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(value(cells[f"{r}|{n}"]) if f"{r}|{n}" in cells else "—" for n in ns)
                     + " |")
    return lines


def _distill_rows(d: dict) -> dict:
    """The section's row groups as its JSON names them (older JSONs: the rows run at every n)."""
    if "rows" in d:
        return d["rows"]
    main = main_rows(d)
    return {"paper": main, "ablations": [r for r in dict.fromkeys(c["row"] for c in d["cells"].values())
                                         if r not in main]}


def _distill(d: dict | None, folder: str) -> tuple[str, list[str]]:
    if d is None:
        return _missing("jacmatch experiment distill"), []
    cells, samples, rows = d["cells"], d["samples"], _distill_rows(d)
    done = f"**Partial: {len(cells)} cells have run so far**; `jacmatch experiment distill` resumes the rest. " \
        if not d.get("complete", True) else ""
    chosen = _chosen(d["selection"], (
        ("lr", "the learning rate on CE, with the rule's step budget at that n"),
        ("check_steps", "that n's own step budget on CE"),
        ("steps", "the step budget on CE+KD (optimizer steps per student)"), ("tau", "τ on CE+KD"),
        ("gamma", "γ on CE+KD+JM (also used by KD+JM, label and projection)"), ("gamma_ce", "γ on CE+JM"),
        ("gamma_sq", "γ on CE+KD+JM sq"), ("sigma", "σ of noisy KD (one draw)")))
    budget = (f"every student takes about {d['steps']} optimizer steps (Adam, cosine schedule), whatever n" if
              "budgets" not in d else "a student of n samples per class takes " + ", ".join(
                  f"{s} steps at n={n}" for n, s in d["budgets"].items()) + f" (the budget chosen on validation, or "
              f"{d['budget_rule']['min_epochs']} passes over its data, at most {d['budget_rule']['max_steps']} "
              "steps: the time the section may take)" + _budget_at_check(d) + _step_cap(d))
    lines = [done + f"Student: {d['student']}; {len(d['seeds'])} seeds per cell; {budget}. Test accuracy (%), mean ± "
             f"std over seeds. Chosen on the validation split, in this order: {chosen}.\n"]
    lines += _table(cells, rows["paper"], samples, lambda c: _pm(c["acc"]))
    lines += ["", "95% interval half-widths of those means (Student's t over the seeds), in points:", ""]
    lines += _table(cells, rows["paper"], samples, lambda c: f"±{100 * c['acc']['ci95']:.1f}")
    lines += _equal_compute(d, rows) + _budget_check(d)
    if rows.get("ablations"):
        ns = sorted({c["samples_per_class"] for c in cells.values() if c["row"] in rows["ablations"]})
        lines += ["", "Ablations (form and which Jacobians):", ""]
        lines += _table(cells, ["CE+KD+JM"] + rows["ablations"], ns, lambda c: _pm(c["acc"]))
    lines += ["", "Mean cosine between teacher and student input-gradients (test set, teacher's top-1):", ""]
    lines += _table(cells, rows["paper"], samples, lambda c: f"{c['jacobian_cosine']['mean']:.3f}")
    return "\n".join(lines) + f"\n\n![distillation]({_img(folder, 'distill')})\n", _distill_findings(d)


def _converge(c: dict | None, folder: str) -> tuple[str, list[str]]:
    """The converged view: every student early-stopped inside a maximum that never binds."""
    if c is None:
        return _missing("jacmatch experiment converge"), []
    cells, ns, rows, rule = c["cells"], c["samples"], c["rows"], c["rule"]
    done = "" if c.get("complete", True) else \
        f"**Partial: {len(cells)} cells have run so far**; `jacmatch experiment converge` resumes the rest. "
    chosen = c["chosen"]
    lines = [done + f"Every student trains at a constant learning rate ({chosen['lr']:g}, τ = {chosen['tau']:g}, "
             f"γ = {chosen['gamma']:g}, γ for CE+JM = {chosen['gamma_ce']:g}: section 2's choices on validation) up "
             f"to a maximum of {rule['first_max_steps']} steps, is evaluated on validation every "
             f"{rule['eval_every_epochs']} epochs, and "
             f"stops after {rule['patience']} evaluations without a validation accuracy better by more than "
             f"{100 * rule.get('min_delta', 0):g} point; its best weights "
             "are tested. A maximum where a seed's best point lies (or that stops no seed) is doubled, up to "
             f"{rule['growths']} times. Test accuracy (%), mean ± std over {len(c['seeds'])} seeds:\n"]
    lines += _table(cells, rows, ns, lambda x: _pm(x["acc"]))
    lines += ["", "Where the best validation accuracy was: mean step (of the maximum); ✓ when every seed's best point "
              "lies strictly inside its maximum and the run stopped early:", ""]
    lines += _table(cells, rows, ns, lambda x: f"{x['best_step']['mean']:.0f} of {x['max_steps']} "
                    + ("✓" if x["inside"] else "**✗ binds**"))
    lines += ["", "Budget check: CE and CE+KD again with twice the patience and maximum; the change in validation "
              "accuracy (points); a student that has converged gains under 0.5:", ""]
    lines += ["| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for row in c["checked_rows"]:
        lines.append(f"| {row} | " + " | ".join(_gain(cells.get(f"{row} (2× patience)|{n}")) for n in ns) + " |")
    lines += ["", f"Time to accuracy: training seconds (and steps) to reach {100 * rule['reach']:.0f}% of the row's own "
              "best validation accuracy, mean over seeds:", ""]
    lines += _table(cells, rows, ns, lambda x: _reached(x["to_own_99"], None))
    lines += ["", "… and to reach CE+KD's converged validation accuracy at that n (seeds that reach it):", ""]
    lines += _table(cells, rows, ns, lambda x: _reached(x["to_kd"], x["to_kd"]) if "to_kd" in x else "—")
    lines += ["", f"![validation accuracy against training time]({_img(folder, 'converge_curves')})"]
    return "\n".join(lines) + "\n", _converge_findings(c)


def _gain(cell: dict | None) -> str:
    return "—" if cell is None else f"{cell['val_gain']:+.1f}{_check_flag(cell['val_gain'])}"


def _check_flag(val_gain: float) -> str:
    """A budget check's verdict, one-sided as the growth rule is: a baseline that gains
    CONVERGED_GAIN or more at twice its budget has not converged; one that loses as much is
    named too (it is not "within" the bound), but its budget did not hold it back."""
    if not converged(val_gain):
        return " **not converged**"
    return " (lower when trained longer)" if val_gain <= -CONVERGED_GAIN else ""


def _reached(to: dict, count: dict | None) -> str:
    if not to or to.get("seconds") is None:
        return "not reached"
    seeds = f" ({count['reached']}/{count['seeds']})" if count else ""
    seconds = to["seconds"]["mean"]
    return f"{seconds:.{0 if seconds >= 10 else 1}f} s ({to['steps']['mean']:.0f} steps){seeds}"


def _small_over_large(c: dict) -> tuple[float, int, int, list, list] | None:
    """Is JM's gain over CE+KD larger at n ≤ 10 than at n ≥ 100? Per seed: the mean gain
    over the small n minus that over the large n; (mean, seeds where positive, seeds, small, large)."""
    small = [n for n in c["samples"] if n <= 10 and f"CE+KD+JM|{n}" in c["cells"]]
    large = [n for n in c["samples"] if n >= 100 and f"CE+KD+JM|{n}" in c["cells"]]
    if not small or not large:
        return None

    def gain(n):
        kd, jm = c["cells"][f"CE+KD|{n}"]["acc"]["values"], c["cells"][f"CE+KD+JM|{n}"]["acc"]["values"]
        return [b - a for a, b in zip(kd, jm)]
    seeds = len(gain(small[0]))
    per_seed = [sum(gain(n)[s] for n in small) / len(small) - sum(gain(n)[s] for n in large) / len(large)
                for s in range(seeds)]
    return 100 * sum(per_seed) / seeds, sum(d > 0 for d in per_seed), seeds, small, large


def _converge_findings(c: dict) -> list[str]:
    # JM's gain at convergence is the verdict "Claim (b), at convergence"; said once, there
    if not _paired_by_n(c, "CE+KD", "CE+KD+JM"):
        return []
    binding = [k for k, x in c["cells"].items() if not x["inside"]]
    checks = [(k, x["val_gain"]) for k, x in c["cells"].items() if "val_gain" in x]
    return ["Budgets at convergence: " + ("every best point lies inside its maximum" if not binding else
            f"**the maximum still binds for {', '.join(binding)}**") + "; with twice the patience, CE and CE+KD "
            "change validation accuracy by " + ", ".join(f"{k.split('|')[0].split(' (')[0]} n={k.split('|')[1]}: "
                                                         f"{g:+.1f}" for k, g in checks) + " points."]


def _budget_at_check(d: dict) -> str:
    """Where the budget is checked, its own budget chosen on validation (not the rule's)."""
    if "check_steps" not in d["selection"]:
        return ""
    return (f"; at n={d['budget_check_samples']}, where the budget is checked, its own budget is chosen on validation "
            "among the rule's and its doublings (below)")


def _step_cap(d: dict) -> str:
    """Whether the cap on the chosen budget bound: validation preferred more steps than the
    section's time allows at small n."""
    cap, chosen = d["budget_rule"].get("max_chosen_steps"), d["selection"]["steps"]["chosen"]
    if cap is None or chosen <= cap:
        return ""
    capped = ", ".join(f"n={n}" for n, steps in d["budgets"].items() if steps == cap)
    return (f"; **validation chose {chosen} steps, capped at {cap}**: at {capped} the budget is bounded by the time "
            "the section may take (2 cores), a natural bound, not a choice inside the grid")


def _equal_compute(d: dict, rows: dict) -> list[str]:
    """Test accuracy, accuracy under noise σ = 0.3 and training seconds of the rows that
    cost what JM costs: noisy KD (M draws) and CE+KD trained for CE+KD+JM's time."""
    if not rows.get("equal_compute"):
        return []
    cells, ns, group = d["cells"], d["samples"], rows["equal_compute"]
    secs = lambda c: f"{c['loop_seconds']['mean']:.0f}" if "loop_seconds" in c else "—"  # noqa: E731
    m = d["noise_draws_equal"]
    draws = (f"M = 1 and M = {m} draws, the M at which noisy KD costs what a KD + JM step costs" if m > 1 else
             "M = 1 draw, which is also the M at JM's cost: one draw already takes longer than a CE+KD+JM step, "
             "since the teacher's outputs and Jacobians on the fixed training inputs are cached while noisy inputs "
             "need the teacher every step (seconds below)")
    return (["", f"At equal compute (Proposition 1 read as a recipe: CE+KD on noisy inputs, σ chosen on validation, "
             f"{draws}; and CE+KD trained for as long as CE+KD+JM took). Test accuracy (%):", ""]
            + _table(cells, group, ns, lambda c: _pm(c["acc"]))
            + ["", "Test accuracy under Gaussian input noise σ = 0.3 (%):", ""]
            + _table(cells, group, ns, lambda c: _pm(c["noisy_acc"]["0.3"]) if "0.3" in c["noisy_acc"] else "—")
            + ["", "Training seconds per student (the epochs' own time, mean over seeds; 2-core CPU):", ""]
            + _table(cells, group, ns, secs))


def _budget_pair(d: dict) -> tuple | None:
    """(n, CE cell, CE at twice its budget, difference in points) where the budget is checked."""
    n = d.get("budget_check_samples")
    ce, doubled = (d["cells"].get(f"{r}|{n}") for r in _distill_rows(d).get("budget_check", ["", ""]))
    return (n, ce, doubled, 100 * (doubled["acc"]["mean"] - ce["acc"]["mean"])) if ce and doubled else None


def _budget_check(d: dict) -> list[str]:
    if (pair := _budget_pair(d)) is None:
        return []
    n, ce, doubled, diff = pair
    verdict = "converged (under 1 point)" if abs(diff) < 1 else "**not converged** (1 point or more)"
    val = (f" (validation: {_pm(ce['val_acc'])}% and {_pm(doubled['val_acc'])}%)"
           if "val_acc" in ce and "val_acc" in doubled else "")
    return ["", f"Is the budget enough? CE at n = {n}: {_pm(ce['acc'])}% with {ce['steps']} steps, "
            f"{_pm(doubled['acc'])}% with {doubled['steps']} steps: {diff:+.1f} points, {verdict}{val}."]


def _paired(a: list[float], b: list[float]) -> tuple[float, str]:
    """b minus a over seeds paired by index: the mean, and a text in points with the wins."""
    diff = [y - x for x, y in zip(a, b)]
    mean = sum(diff) / len(diff)
    return mean, f"{100 * mean:+.1f} ({sum(x > 0 for x in diff)}/{len(diff)} seeds)"


def _distill_findings(d: dict) -> list[str]:
    out = []
    for n in d["samples"]:
        kd, jm = d["cells"].get(f"CE+KD|{n}"), d["cells"].get(f"CE+KD+JM|{n}")
        if kd and jm:
            out.append((n, *_paired(kd["acc"]["values"], jm["acc"]["values"])))
    if not out:
        return []
    best = max(out, key=lambda t: t[1])
    text = ", ".join(f"n={n}: {t}" for n, _, t in out)
    partial = "" if d.get("complete", True) else " (partial run: only these n so far)"
    findings = [f"Distillation on Fashion-MNIST{partial}: adding Jacobian matching to CE+KD changes test accuracy "
                f"by {text} (points, paired by seed); the largest gain is at n={best[0]} samples per class."]
    alone = [(n, d["cells"][f"CE+JM|{n}"]["acc"]["mean"] - d["cells"][f"CE|{n}"]["acc"]["mean"])
             for n in d["samples"] if f"CE+JM|{n}" in d["cells"] and f"CE|{n}" in d["cells"]]
    if alone:
        findings.append("Jacobian matching without KD (CE+JM against CE, γ chosen for CE+JM on validation): "
                        + ", ".join(f"n={n}: {100 * m:+.1f}" for n, m in alone) + " points.")
    return findings + _compute_findings(d)


def _compute_findings(d: dict) -> list[str]:
    """Is JM worth its cost? CE+KD+JM against each row that costs as much (paired by seed);
    worth it at an n where it beats every one of them on average, in at least 4 of 5 seeds."""
    rivals = [r for r in _distill_rows(d).get("equal_compute", []) if r not in ("CE+KD", "CE+KD+JM")]
    pairs = {r: {n: (m, w, k) for n, m, w, k in _paired_by_n(d, r, "CE+KD+JM")} for r in rivals}
    ns = [n for n in d["samples"] if rivals and all(n in pairs[r] for r in rivals)]
    if not ns:
        return []
    worth = [n for n in ns if all(_holds(*pairs[r][n]) for r in rivals)]
    against = "; ".join(f"against {r}: " + ", ".join(f"n={n}: {pairs[r][n][0]:+.1f} ({pairs[r][n][1]}/{pairs[r][n][2]})"
                                                      for n in ns) for r in rivals)
    where = (f"worth its cost at {', '.join(f'n={n}' for n in worth)}" if worth else "not worth its cost at any n")
    rest = [n for n in ns if n not in worth]
    return [f"At equal compute, CE+KD+JM − the rows that cost as much, test points (seeds won) {against}: Jacobian "
            f"matching is {where}" + (f", not at {', '.join(f'n={n}' for n in rest)}" if worth and rest else "") + "."]


def _budget_findings(d: dict | None, r: dict | None) -> list[str]:
    """Whether the step budget, rather than n, limits the students: CE at the n where the
    budget is checked, with its budget and twice it; against the same network trained
    with CE on the full set (section 3)."""
    if d is None or r is None:
        return []
    full, pair = r["cells"].get("CE|full"), _budget_pair(d)
    if pair is None or full is None:
        return []
    n, ce, doubled, diff = pair
    return [f"Step budgets: a CE student at n={n} reaches {_pm(ce['acc'])}% with its budget of {ce['steps']} steps "
            f"and {_pm(doubled['acc'])}% with twice as many ({diff:+.1f} points): "
            + ("the students have converged at their budget" if abs(diff) < 1 else "the budget still limits them")
            + f"; the same network trained on the full set for longer (section 3) reaches {_pm(full['acc'])}%."]


def _robust(r: dict | None, d: dict | None, folder: str) -> tuple[str, list[str]]:
    if r is None:
        return _missing("jacmatch experiment robustness"), []
    sigmas = noise_sigmas(r)
    head = "| method | training set | σ=0 | " + " | ".join(f"σ={s}" for s in sigmas) + " |"
    lines = [f"σ_train = {r['sigma_train']}; {len(r['seeds'])} seeds; test accuracy (%) under Gaussian noise of "
             "standard deviation σ (units of the [0, 1] pixel range).", "", head, "|---|---|" + "---|" * (1 + len(sigmas))]
    for c in r["cells"].values():
        if "val_gain" not in c:
            lines.append(f"| {c['row']} | {c['training_set']} | {_pm(c['acc'])} | "
                         + " | ".join(_pm(c["noisy_acc"][s]) for s in sigmas) + " |")
    lines += _budget_checks([c for c in r["cells"].values() if "val_gain" in c], "training_set",
                            [c for c in r["cells"].values() if "val_gain" not in c])
    findings = []  # the distilled students under noise are claim (c)'s verdict: said there, once
    if d is not None:
        ns = [n for n in d["samples"] if f"CE+KD+JM|{n}" in d["cells"]]
        lines += ["", "The students of section 2 under the same noise (σ = 0.3):", "",
                  "| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for row in ("CE+KD", "CE+KD+JM", "KD", "KD+JM"):
            if all(f"{row}|{n}" in d["cells"] for n in ns):
                lines.append(f"| {row} | " + " | ".join(_pm(d["cells"][f"{row}|{n}"]["noisy_acc"]["0.3"]) for n in ns) + " |")
        if ns:
            lines += ["", f"![students under noise]({_img(folder, 'distill_noise')})"]
    full = {c["row"]: c for c in r["cells"].values() if c["training_set"] == "full" and "val_gain" not in c}
    for sigma in ("0.1", "0.5"):
        if full and sigma in sigmas:
            text = ", ".join(f"{row} {_pm(c['noisy_acc'][sigma])}%" for row, c in full.items())
            if sigma == "0.1":
                text += " (clean: " + ", ".join(f"{row} {_pm(c['acc'])}%" for row, c in full.items()) + ")"
            findings.append(f"Robustness (full training set, test noise σ = {sigma}): {text}.")
    return "\n".join(lines) + f"\n\n![robustness]({_img(folder, 'robustness')})\n", findings


def _budget_checks(cells: list[dict], where: str, rows: list[dict] = ()) -> list[str]:
    """The baselines at twice their budget: the change in validation and test accuracy; and
    the epochs every row trained for (``rows``), grown while a baseline still gained."""
    if not cells:
        return []
    lines = ["", "Budget check: the baselines trained for twice their epochs, against their own budget (points, "
             "means over seeds; a baseline that has converged gains under 0.5 of validation accuracy):", "",
             "| baseline | at | epochs | validation | test |", "|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['row']} | {c[where]} | {c['epochs']} | {c['val_gain']:+.1f}{_check_flag(c['val_gain'])} "
                     f"| {c['test_gain']:+.1f} |")
    grown = {c[where]: c for c in rows if "grown_from" in c}  # the rows of one training set share their epochs
    if grown:
        lines += ["", "Every row of a training set trains for the epochs its baselines need: doubled while a "
                  "baseline gained 0.5 point of validation accuracy or more at twice them. " + "; ".join(
                      f"{at}: {c['epochs']} epochs" + (" (grown from " + ", ".join(
                          f"{e}, where the baselines gained " + ", ".join(f"{r} {g:+.1f}" for r, g in gains.items())
                          for e, gains in zip(c["grown_from"], c["gains_grown_from"])) + ")" if c["grown_from"] else "")
                      for at, c in grown.items()) + "."]
    return lines


def _transfer(t: dict | None) -> tuple[str, list[str]]:
    if t is None:
        return _missing("jacmatch experiment transfer"), []
    ns = sorted({c["samples_per_class"] for c in t["cells"].values()})
    rows = list(dict.fromkeys(c["row"] for c in t["cells"].values()))
    chosen = _chosen(t.get("selection", {}), (("delta", "δ (AT)"), ("delta_jacobian", "δ_J (AT Jacobians)")))
    lines = [f"Source teacher (classes 0–4): test accuracy {100 * t['source_teacher']['test']['acc']:.2f}%. "
             f"Target task: classes 5–9; {len(t['seeds'])} seeds; test accuracy (%), mean ± std."
             + (f" Chosen on the validation split, in this order: {chosen}." if chosen else ""), "",
             "| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for r in rows:
        if not any("val_gain" in t["cells"].get(f"{r}|{n}", {}) for n in ns):
            lines.append(f"| {r} | " + " | ".join(_pm(t["cells"][f"{r}|{n}"]["acc"]) for n in ns) + " |")
    lines += _budget_checks([c for c in t["cells"].values() if "val_gain" in c], "samples_per_class",
                            [c for c in t["cells"].values() if "val_gain" not in c])
    findings = []
    for a, b, what in (("CE (scratch)", "CE+AT", "attention transfer versus CE from scratch"),
                       ("CE+AT", "CE+AT+JM", "AT + Jacobians versus AT alone")):
        pairs = [(n, t["cells"].get(f"{a}|{n}"), t["cells"].get(f"{b}|{n}")) for n in ns]
        diffs = [f"n={n}: {_paired(x['acc']['values'], y['acc']['values'])[1]}" for n, x, y in pairs if x and y]
        if diffs:
            findings.append(f"Transfer (Fashion-MNIST classes 0–4 → 5–9), {what}: " + ", ".join(diffs)
                            + " points of test accuracy (paired by seed).")
    return "\n".join(lines) + "\n", findings


def _verify(v: list | dict | None, folder: str) -> tuple[str, list[str]]:
    if v is None:
        return _missing("jacmatch experiment verify"), []
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
            + f"\n\n![propositions]({_img(folder, 'verify')})\n"), findings


def _section_time(name: str, j: dict | None) -> str | None:
    """Training time summed over a section's runs (the teacher: its own training), which is
    what a rerun from scratch costs; and the wall time of the section's last invocation
    when it is about as long (a shorter one reused finished runs and says nothing)."""
    if j is None:
        return None
    runs = j.get("train_seconds" if name == "teacher" else "run_seconds", j.get("section_seconds"))
    wall = j.get("section_seconds")
    text = f"{runs / 60:.1f} min" + (" (over the 60-minute budget)" if runs > 3600 else "")
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


# ---- the paper's claims, each with a verdict -------------------------------------------------

CLAIMS = {  # claim: how this setting differs from the paper's
    "(a) Jacobian matching is distillation on noisy inputs to second order, and a Jacobian penalty is "
    "noise training (Propositions 1 and 2)": "small float64 MLPs and one input, against the closed forms; the paper "
    "states the propositions without a numerical check",
    "(b) Jacobian matching improves distillation, most with few samples": "Fashion-MNIST, a ResNet-20 teacher and a "
    "small CNN student trained for a few hundred to a few thousand steps on 2 CPU cores (the paper: CIFAR-100, WRNs, "
    "full training)",
    "(c) Jacobian matching makes students more robust to noisy inputs": "test noise added to Fashion-MNIST images; "
    "the paper measures it on CIFAR-100",
    "(d) Jacobian matching helps transfer learning with attention transfer": "Fashion-MNIST classes 0–4 to 5–9 (the "
    "paper: ImageNet to MIT Scenes with VGG/ResNet)",
}


def _paired_by_n(section: dict, a: str, b: str, metric=lambda c: c["acc"]) -> list[tuple]:
    """(n, mean of b − a in points, seeds where b wins, seeds) for every n where both ran."""
    out = []
    for n in sorted({c["samples_per_class"] for c in section["cells"].values()}):
        x, y = section["cells"].get(f"{a}|{n}"), section["cells"].get(f"{b}|{n}")
        if x and y:
            diff = [q - p for p, q in zip(metric(x)["values"], metric(y)["values"])]
            out.append((n, 100 * sum(diff) / len(diff), sum(v > 0 for v in diff), len(diff)))
    return out


def _holds(mean: float, wins: int, seeds: int) -> bool:
    """A gain that holds: positive on average and in at least 4 of 5 seeds."""
    return mean > 0 and wins >= 0.8 * seeds


def _verdict(pairs: list[tuple]) -> str:
    """Confirmed: b wins on average at every n, in at least 4 of 5 seeds each; partly: at some n; else not."""
    strong = [_holds(m, w, k) for _, m, w, k in pairs]
    return "confirmed" if pairs and all(strong) else "partly confirmed" if any(strong) else "not confirmed"


def _evidence(pairs: list[tuple]) -> str:
    return ", ".join(f"n={n}: {m:+.1f} ({w}/{k})" for n, m, w, k in pairs)


def _verdicts(sections: dict) -> list[tuple[str, str, str, str]]:
    """(claim, verdict, numbers, how the setting differs) for each claim whose sections ran."""
    d, tr, v = sections.get("distill"), sections.get("transfer"), sections.get("verify")
    records = v.get("records", []) if isinstance(v, dict) else v or []
    claims, out = list(CLAIMS.items()), []
    if records:
        full = [r["slope"] for r in records if r["activation"] != "relu" and r["form"] == "full" and r["slope"]]
        short = [r["slope"] for r in records if r["activation"] != "relu" and r["form"] == "short"
                 and r["proposition"].endswith("ce") and r["slope"]]
        ok = full and min(full) >= 3.5 and short and all(1.5 <= x <= 2.5 for x in short)
        out.append((*claims[0][:1], "confirmed" if ok else "partly confirmed",
                    f"full forms' residuals fall like σ^{min(full):.2f}–σ^{max(full):.2f} on smooth networks (theory 4), "
                    f"short cross-entropy forms like σ^{min(short):.2f}–σ^{max(short):.2f} (theory 2)", claims[0][1]))
    c = sections.get("converge")
    partial = c is not None and not c.get("complete", True)
    at = "at convergence" + ("; partial run, only the n listed" if partial else "")

    def so_far(verdict: str) -> str:  # a partial run's verdict holds for the n run so far
        return f"{verdict} so far" if partial else verdict
    if c is not None and _paired_by_n(c, "CE+KD", "CE+KD+JM"):
        pairs = _paired_by_n(c, "CE+KD", "CE+KD+JM")
        out.append((f"(b) Jacobian matching improves distillation ({at})", so_far(_verdict(pairs)),
                    "CE+KD+JM − CE+KD, every student early-stopped inside its maximum, test points (seeds won): "
                    + _evidence(pairs), claims[1][1]))
        shape = _small_over_large(c)
        if shape is not None:
            mean, wins, seeds, small, large = shape
            out.append((f"(b) … most with few samples ({at})",
                        so_far("confirmed" if _holds(mean, wins, seeds) else "not confirmed"),
                        f"JM's gain at n ≤ 10 ({', '.join(map(str, small))}) minus its gain at n ≥ 100 "
                        f"({', '.join(map(str, large))}), paired by seed: {mean:+.1f} points ({wins}/{seeds})",
                        claims[1][1]))
        noisy = _paired_by_n(c, "CE+KD", "CE+KD+JM", lambda x: x["noisy_acc"]["0.3"])
        if noisy:
            out.append((f"(c) Jacobian matching makes students more robust to noisy inputs ({at})",
                        so_far(_verdict(noisy)), "CE+KD+JM − CE+KD under test noise σ = 0.3, every student early-stopped, "
                        "points (seeds won): " + _evidence(noisy), claims[2][1]))
    if d is not None:
        pairs = _paired_by_n(d, "CE+KD", "CE+KD+JM")
        view = f" ({_equal_budget(d)})" if c is not None else ""
        label = f"(b) Jacobian matching improves distillation{view}" if c is not None else claims[1][0]
        out.append((label, _verdict(pairs), "CE+KD+JM − CE+KD, test points (seeds won): " + _evidence(pairs),
                    claims[1][1]))
        noisy = _paired_by_n(d, "CE+KD", "CE+KD+JM", lambda c: c["noisy_acc"]["0.3"])
        out.append((claims[2][0] + view, _verdict(noisy),
                    "CE+KD+JM − CE+KD under test noise σ = 0.3, points (seeds won): "
                    + _evidence(noisy), claims[2][1]))
    if tr is not None:
        pairs = _paired_by_n(tr, "CE+AT", "CE+AT+JM")
        at = _paired_by_n(tr, "CE (scratch)", "CE+AT")
        out.append((claims[3][0] + _transfer_view(tr), _verdict(pairs), "CE+AT+JM − CE+AT, test points (seeds won): "
                    + _evidence(pairs) + "; CE+AT − CE: " + _evidence(at), claims[3][1]))
    return out


def _transfer_view(tr: dict) -> str:
    """Where (d)'s rows were compared: at their baselines' convergence when every budget
    check gained under CONVERGED_GAIN; nothing said for a section without checks."""
    checks = [c for c in tr["cells"].values() if "val_gain" in c]
    if not checks:
        return ""
    if all(converged(c["val_gain"]) for c in checks):
        return " (at its baselines' convergence)"
    return " (at the epochs' cap: a baseline still gains at twice them)"


def _equal_budget(d: dict) -> str:
    """Section 2's view, named by its steps: ``at an equal budget of 400 steps, 3200 at n=500``."""
    budgets = {int(n): int(b) for n, b in (d.get("budgets") or {str(n): d["steps"] for n in d["samples"]}).items()}
    common = max(sorted(set(budgets.values())), key=list(budgets.values()).count)
    others = ", ".join(f"{b} at n={n}" for n, b in sorted(budgets.items()) if b != common)
    return f"at an equal budget of {common} steps" + (f", {others}" if others else "")


def _claim_label(claim: str) -> str:
    """``(b)``, with the claim's view when it names one: ``(b), at convergence``; a part of a
    claim keeps its words: ``(b) … most with few samples, at convergence``."""
    letter = claim.split(")")[0] + ")"
    view = re.search(r"\((at [^)]*)\)$", claim)
    part = claim[len(letter):view.start() if view else None].strip()
    head = f"{letter} {part}" if part.startswith("…") else letter
    return f"{head}, {view.group(1)}" if view else head


def _verdict_table(rows: list[tuple]) -> str:
    if not rows:
        return "*No section has run yet.*\n"
    lines = ["| claim | verdict | numbers (seeds) | how this setting differs from the paper's |", "|---|---|---|---|"]
    lines += [f"| {c} | **{v}** | {e} | {diff} |" for c, v, e, diff in rows]
    return "Confirmed: the gain holds on average at every n, in at least 4 of 5 seeds each; partly: at some n; " \
           "not confirmed: at none.\n\n" + "\n".join(lines) + "\n"


def load_sections(folder: Path) -> dict:
    """The section JSONs in ``folder`` (None for a section not run yet)."""
    sections = {name: load_json(folder / f"{name}.json") for name in SECTIONS}
    check_one_data_set(sections)
    return sections


def render_report(sections: dict, folder: str = "paper", gradients: bool = True) -> tuple[str, list[str]]:
    """REPORT.md's text and the findings, from the section JSONs; ``folder`` is where the
    plots are, relative to the report; ``gradients``: whether gradients.png exists."""
    t, d, r, tr, v, c = (sections.get(k) for k in SECTIONS)
    distill_md, f_distill = _distill(d, folder)
    converge_md, f_converge = _converge(c, folder)
    if c is not None:  # JM's gains at an equal budget are the verdict "Claim (b), at an equal budget of …"
        f_distill = [f for f in f_distill if not f.startswith("Distillation on Fashion-MNIST")]
    robust_md, f_robust = _robust(r, d, folder)
    transfer_md, f_transfer = _transfer(tr)
    verify_md, f_verify = _verify(v, folder)
    verdicts = _verdicts(sections)
    findings = [f"Claim {_claim_label(c)}: **{v}**" + f" ({e})." for c, v, e, _ in verdicts]
    findings += _teacher_findings(t) + f_verify + f_converge + f_distill + _budget_findings(d, r) + f_robust + f_transfer
    times = {name: _section_time(name, sections.get(name)) for name in ("teacher", "distill", "robustness", "transfer")}
    parts = [
        "# jacmatch: the paper's claims measured on Fashion-MNIST\n",
        "Generated by `jacmatch report` from the JSON files in `results/paper/`; every run's config and seed is "
        "in `runs/paper/*/config.yaml` when rerun (`jacmatch experiment all`).\n",
        "## The paper's claims\n", _verdict_table(verdicts),
        "## Findings\n", "\n".join(f"- {f}" for f in findings) or "*No section has run yet.*", "",
        "## 1. Teacher\n", _teacher(t),
        "## 2. Distillation with few samples\n", distill_md,
        "## 2b. Distillation at convergence\n", converge_md,
        "## 3. Robustness to noisy inputs\n", robust_md,
        "## 4. Transfer\n", transfer_md,
        "## 5. Propositions and pictures\n", verify_md,
        (f"![gradients]({_img(folder, 'gradients')})\n\nThe mean cosine between teacher and student input-gradients on the "
         "test set, for every student, is the last table of section 2.\n")
        if gradients else _missing("jacmatch experiment pictures"),
        "## How this differs from the paper\n",
        "- Data: Fashion-MNIST (the paper: CIFAR-10/100 and MIT Scenes), because it installs from Debian and trains on "
        "2 CPU cores; the CIFAR configs are in `jacmatch/configs/cifar/`.",
        "- Architectures: a ResNet-20 teacher and a small 3-stage CNN student (the paper: WRNs and VGG/ResNet), sized "
        "for a 2-core CPU.",
        "- Epochs: far fewer than the paper (" + (f"{t['epochs']} for the teacher" if t else "a few for the teacher")
        + (f", about {d['steps']} optimizer steps for every student). The step budget, τ and γ are chosen on the "
           f"validation split at n = {d['selection']['steps']['samples_per_class']} and used at every n; the step "
           f"budgets tried ({d['selection']['steps']['grid']}) stop where the distillation section still reruns "
           "within 60 minutes (its time is below)." if d and "steps" in d else ", a few hundred steps for students)."),
        "",
        "## Section times (2-core CPU; training time summed over each section's runs)\n",
        "\n".join(f"- {k}: {v}" for k, v in times.items() if v is not None) or "*none yet*", "",
    ]
    return "\n".join(parts), findings


def write_findings_into_readme(findings: list[str], readme: Path = Path("README.md")) -> None:
    if not readme.is_file():
        return
    text = readme.read_text()
    block = "<!-- findings:start (written by `jacmatch report`) -->\n" + (
        "\n".join(f"- {f}" for f in findings) or "- No experiment has been run yet.") + "\n<!-- findings:end -->"
    new = re.sub(r"<!-- findings:start.*?<!-- findings:end -->", lambda _: block, text, flags=re.S)
    if new != text:
        write_atomic(readme, lambda f: f.write(new))


def main(results_dir: str | None = None) -> None:
    folder = Path(results_dir) if results_dir else RESULTS / "paper"
    folder.mkdir(parents=True, exist_ok=True)
    sections = load_sections(folder)
    text, findings = render_report(sections, folder.name, (folder / "gradients.png").is_file())
    draw_report_figures(sections, folder)
    write_atomic(folder.parent / "REPORT.md", lambda f: f.write(text))
    if folder == RESULTS / "paper":  # only the real experiments speak in the README
        write_findings_into_readme(findings)
    write_benchmarks(RESULTS / "bench.json", Path("BENCHMARKS.md"))
    print(f"wrote {folder.parent / 'REPORT.md'}" + (" and BENCHMARKS.md" if (RESULTS / "bench.json").is_file() else ""))
