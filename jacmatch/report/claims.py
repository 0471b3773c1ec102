"""The paper's claims, each with a verdict from the result files: what was compared, paired
by seed, and how this setting differs from the paper's."""

from __future__ import annotations

import re

from ..experiments import rows as R
from ..experiments.common import converged
from .distill import equal_time_pairs, small_over_large
from .fidelity import FIDELITY_SIGMA, agreement_at
from ..paper.protocol import transfer_classes
from ..experiments.report_text import cores, evidence, holds, paired_by_n, signed, span, verdict_of

__all__ = ["claims", "verdicts", "claim_label", "verdict_table"]


def claims(sections: dict) -> dict[str, str]:
    """Each claim and how this setting differs from the paper's, with the models, machine
    and classes that the result files and configs name."""
    t, d = sections.get("teacher") or {}, sections.get("distill") or {}
    teacher, student = (f"a {t['model']} teacher" if t else "a teacher"), d.get("student", "a small CNN")
    source, target = (span(c) for c in transfer_classes())
    return {
        "(a) Jacobian matching is distillation on noisy inputs to second order, and a Jacobian penalty is "
        "noise training (Propositions 1 and 2)": "small float64 MLPs and one input, against the closed forms; the "
        "paper states the propositions without a numerical check",
        "(b) Jacobian matching improves distillation, most with few samples": f"Fashion-MNIST, {teacher} and "
        f"a {student} student trained for a few hundred to a few thousand steps on {cores(d, t)} CPU cores (the paper: "
        "CIFAR-100, WRNs, full training)",
        "(c) Jacobian matching makes students more robust to noisy inputs": "test noise added to Fashion-MNIST images; "
        "the paper measures it on CIFAR-100",
        "(d) Jacobian matching helps transfer learning with attention transfer": f"Fashion-MNIST classes {source} to "
        f"{target} (the paper: ImageNet to MIT Scenes with VGG/ResNet)",
        "(e) Jacobian matching makes the student a more faithful copy of its teacher around the data": "top-1 agreement "
        "with the teacher (Stanton et al. 2021) under test noise and between test points, from the converged "
        "students' kept weights; the paper derives it (Proposition 1) but does not measure it",
        "(f) Jacobian matching against function matching": "not a claim of the paper, which predates function "
        "matching (Beyer et al. 2022): KD alone on consistent crops, flips and mixup, trained as long as it needs, "
        "its values chosen on validation like every row's",
    }


def verdicts(sections: dict) -> list[tuple[str, str, str, str]]:
    """(claim, verdict, numbers, how the setting differs) for each claim whose sections ran."""
    d, tr, v = sections.get("distill"), sections.get("transfer"), sections.get("verify")
    records = v.get("records", []) if isinstance(v, dict) else v or []
    claim, out = list(claims(sections).items()), []
    if records:
        full = [r["slope"] for r in records if r["activation"] != "relu" and r["form"] == "full" and r["slope"]]
        short = [r["slope"] for r in records if r["activation"] != "relu" and r["form"] == "short"
                 and r["proposition"].endswith("ce") and r["slope"]]
        ok = full and min(full) >= 3.5 and short and all(1.5 <= x <= 2.5 for x in short)
        out.append((*claim[0][:1], "confirmed" if ok else "partly confirmed",
                    f"full forms' residuals fall like σ^{min(full):.2f}–σ^{max(full):.2f} on smooth networks (theory 4), "
                    f"short cross-entropy forms like σ^{min(short):.2f}–σ^{max(short):.2f} (theory 2)", claim[0][1]))
    c = sections.get("converge")
    partial = c is not None and not c.get("complete", True)
    at = "at convergence" + ("; partial run, only the n listed" if partial else "")

    def so_far(verdict: str) -> str:  # a partial run's verdict holds for the n run so far
        return f"{verdict} so far" if partial else verdict
    if c is not None and paired_by_n(c, R.CE_KD, R.CE_KD_JM):
        pairs = paired_by_n(c, R.CE_KD, R.CE_KD_JM)
        out.append((f"(b) Jacobian matching improves distillation ({at})", so_far(verdict_of(pairs)),
                    f"{R.CE_KD_JM} − {R.CE_KD}, every student early-stopped inside its maximum, test points (seeds won): "
                    + evidence(pairs), claim[1][1]))
        shape = small_over_large(c)
        if shape is not None:
            mean, wins, seeds, small, large = shape
            out.append((f"(b) … most with few samples ({at})",
                        so_far("confirmed" if holds(mean, wins, seeds) else "not confirmed"),
                        f"JM's gain at n ≤ 10 ({', '.join(map(str, small))}) minus its gain at n ≥ 100 "
                        f"({', '.join(map(str, large))}), paired by seed: {signed(mean)} points ({wins}/{seeds})",
                        claim[1][1]))
        noisy = paired_by_n(c, R.CE_KD, R.CE_KD_JM, lambda x: x.noisy_acc("0.3"))
        if noisy:
            out.append((f"(c) Jacobian matching makes students more robust to noisy inputs ({at})",
                        so_far(verdict_of(noisy)), f"{R.CE_KD_JM} − {R.CE_KD} under test noise σ = 0.3, every "
                        "student early-stopped, points (seeds won): " + evidence(noisy), claim[2][1]))
    out += _fidelity_verdicts(sections, claim, so_far)
    if d is not None:
        pairs = paired_by_n(d, R.CE_KD, R.CE_KD_JM)
        view = f" ({_equal_budget(d)})" if c is not None else ""
        label = f"(b) Jacobian matching improves distillation{view}" if c is not None else claim[1][0]
        out.append((label, verdict_of(pairs), f"{R.CE_KD_JM} − {R.CE_KD}, test points (seeds won): " + evidence(pairs),
                    claim[1][1]))
        noisy = paired_by_n(d, R.CE_KD, R.CE_KD_JM, lambda c: c.noisy_acc("0.3"))
        out.append((claim[2][0] + view, verdict_of(noisy),
                    f"{R.CE_KD_JM} − {R.CE_KD} under test noise σ = 0.3, points (seeds won): "
                    + evidence(noisy), claim[2][1]))
    if tr is not None:
        pairs = paired_by_n(tr, R.CE_AT, R.CE_AT_JM)
        at = paired_by_n(tr, R.CE_SCRATCH, R.CE_AT)
        out.append((claim[3][0] + _transfer_view(tr), verdict_of(pairs), f"{R.CE_AT_JM} − {R.CE_AT}, test points (seeds won): "
                    + evidence(pairs) + f"; {R.CE_AT} − CE: " + evidence(at), claim[3][1]))
    return out


def _fidelity_verdicts(sections: dict, claim: list, so_far) -> list[tuple[str, str, str, str]]:
    """Claim (e), on the fidelity section: JM's student agrees more with its teacher under
    test noise and between test points, with CE+KD and with function matching; and (f),
    Jacobian matching against function matching, at convergence and at equal training time."""
    f, c, out = sections.get("fidelity"), sections.get("converge"), []
    (e, e_diff), (fm, fm_diff) = claim[4], claim[5]
    if f is not None:
        for a, b, label in ((R.CE_KD, R.CE_KD_JM, e), (R.FM, R.FM_JM, "(e) … with function matching too")):
            noisy = paired_by_n(f, a, b, agreement_at(FIDELITY_SIGMA))
            between = paired_by_n(f, a, b, agreement_at("interpolated"))
            if noisy and between:
                out.append((f"{label} (at convergence)", so_far(verdict_of(noisy + between)),
                            f"{b} − {a}, agreement with the teacher under test noise σ = {FIDELITY_SIGMA}, points (seeds "
                            f"won): {evidence(noisy)}; between test points: {evidence(between)}", e_diff))
    if c is not None:
        for b, label in ((R.CE_KD_JM, f"{fm}: {R.CE_KD_JM} beats {R.FM}"), (R.FM_JM, f"(f) … {R.FM_JM} beats {R.FM}")):
            for view, pairs, what in (("at convergence", paired_by_n(c, R.FM, b), "test points"),
                                      ("at equal training time", equal_time_pairs(c, R.FM, b),
                                       "validation points at the time the quicker row took to its best")):
                if pairs:
                    out.append((f"{label} ({view})", so_far(verdict_of(pairs)),
                                f"{b} − {R.FM}, {what} (seeds won): {evidence(pairs)}", fm_diff))
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


def claim_label(claim: str) -> str:
    """``(b)``, with the claim's view when it names one: ``(b), at convergence``; a part of a
    claim keeps its words: ``(b) … most with few samples, at convergence``."""
    letter = claim.split(")")[0] + ")"
    view = re.search(r"\((at [^)]*)\)$", claim)
    part = claim[len(letter):view.start() if view else None].strip()
    head = f"{letter} {part}" if part.startswith("…") else letter
    return f"{head}, {view.group(1)}" if view else head


def verdict_table(rows: list[tuple]) -> str:
    if not rows:
        return "*No section has run yet.*\n"
    lines = ["| claim | verdict | numbers (seeds) | how this setting differs from the paper's |", "|---|---|---|---|"]
    lines += [f"| {c} | **{v}** | {e} | {diff} |" for c, v, e, diff in rows]
    return "Confirmed: the gain holds on average at every n, in at least 4 of 5 seeds each; partly: at some n; " \
           "not confirmed: at none.\n\n" + "\n".join(lines) + "\n"
