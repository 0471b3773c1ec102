"""The report's fidelity section (2c): how well each converged student agrees with its
teacher (clean, under test noise, between test points), and its paired differences."""

from __future__ import annotations

from ..experiments.records import Cell, Summary
from ..experiments.report_text import img, missing, pm, table

__all__ = ["fidelity_text", "agreement_at", "FIDELITY_SIGMA"]

FIDELITY_SIGMA = "0.3"  # the test noise of the verdicts (the claims' σ elsewhere in the report)


def agreement_at(where: str):
    """The metric of :func:`~.report_text.paired_by_n` that reads a fidelity cell's top-1
    agreement ``where`` ("clean", "interpolated", or a noise σ such as "0.3")."""
    def metric(cell: Cell) -> Summary:
        agreement = cell.fields["agreement"]
        return Summary.from_json(agreement[where] if where in ("clean", "interpolated") else agreement["noisy"][where])
    return metric


def fidelity_text(f: dict | None, folder: str) -> str:
    """Section 2c: top-1 agreement with the teacher and KL(teacher ‖ student) of every
    converged row at every n, and the agreement-against-noise plot."""
    if f is None:
        return missing("jacmatch experiment fidelity")
    cells, ns, rows = f["cells"], f["samples"], f["rows"]
    done = "" if f.get("complete", True) else \
        f"**Partial: {len(cells)} cells so far**, those of the converged section's partial run; `jacmatch experiment " \
        "converge` then `jacmatch experiment fidelity` compute the rest. "
    sigmas = sorted({s for c in cells.values() for s in c["agreement"]["noisy"]}, key=float)
    kept = f", {f['students']} students, {f['weights_bytes'] / 2**20:.1f} MiB in all" if "weights_bytes" in f else ""
    lines = [done + "Fidelity (Stanton et al. 2021) of the converged students of section 2b, computed from their "
             f"kept weights (`results/{folder}/runs/converge/*.pt`{kept}; `jacmatch experiment fidelity` trains "
             "nothing): the "
             "top-1 agreement with the teacher, and the mean KL(teacher ‖ student) at τ = 1, mean ± std over seeds. "
             "Each student's test accuracy, measured again from its weights, differs from its record by at most "
             f"{100 * max((c['acc_vs_record'] for c in cells.values()), default=0):.2f} points.\n",
             "Agreement (%) on the clean test points:", ""]
    lines += table(cells, rows, ns, lambda x: pm(x["agreement"]["clean"]))
    if FIDELITY_SIGMA in sigmas:
        lines += ["", f"Agreement (%) under test noise σ = {FIDELITY_SIGMA} (the noise of the accuracies under noise):", ""]
        lines += table(cells, rows, ns, lambda x: pm(x["agreement"]["noisy"][FIDELITY_SIGMA]))
    if any("interpolated" in c["agreement"] for c in cells.values()):
        lines += ["", "Agreement (%) between test points (fixed pairs and mixing weights, the same for every student):",
                  ""]
        lines += table(cells, rows, ns, lambda x: pm(x["agreement"]["interpolated"]) if "interpolated" in x["agreement"]
                       else "—")
    lines += ["", "KL(teacher ‖ student) on the clean test points (nats):", ""]
    lines += table(cells, rows, ns, lambda x: pm(x["kl"]["clean"], scale=1.0, digits=3))
    lines += ["", f"![agreement with the teacher against test noise]({img(folder, 'fidelity_noise')})"]
    return "\n".join(lines) + "\n"
