"""The rows of the experiments, by name, and the keys of their cells: the one place the
sections (which write the result files) and the report (which reads them) spell them.

A section's JSON keys each cell ``"ROW|AT"`` (:func:`key`), where AT is the number of
samples per class, or a training set (``full``)."""

from __future__ import annotations

__all__ = ["key", "split_key", "twice_patience", "twice_epochs"]

# Distillation (section 2 and the converged view)
CE = "CE"
CE_KD = "CE+KD"
CE_JM = "CE+JM"
CE_KD_JM = "CE+KD+JM"
KD = "KD"
KD_JM = "KD+JM"
NOISY_KD_1 = "noisy KD M=1"  # CE+KD on noisy inputs, one draw (Proposition 1 as a recipe)
EQUAL_TIME = "CE+KD (JM's time)"  # CE+KD trained for as long as CE+KD+JM took
DOUBLED_STEPS = "CE (2× steps)"  # section 2's budget check
JM_SQ = "CE+KD+JM sq"
JM_LABEL = "CE+KD+JM label"
JM_PROJECTION = "CE+KD+JM projection"
# Function matching (Beyer et al. 2022): KD alone, the teacher on the student's own crops,
# flips and mixup, trained long; and the same with the Jacobian term
FM = "FM"
FM_JM = "FM+JM"

# The Jacobian term on every k-th step, times k (objective.jacobian_every; the schedules section)
FM_JM_SCHEDULED = "FM+JM (every k)"
CE_KD_JM_SCHEDULED = "CE+KD+JM (every k)"

# Transfer (section 4)
CE_SCRATCH = "CE (scratch)"
CE_AT = "CE+AT"
CE_AT_JM = "CE+AT+JM"
ORACLE = "fine-tune teacher (oracle)"

def noisy_kd(draws: int) -> str:
    """Noisy KD with ``draws`` draws per sample."""
    return f"noisy KD M={draws}"


def twice_patience(row: str) -> str:
    """``row`` trained again with twice its patience and maximum (the converged view's check)."""
    return f"{row} (2× patience)"


def twice_epochs(row: str) -> str:
    """``row`` trained again at twice its epochs (the growth rule's check)."""
    return f"{row} (2× epochs)"


def key(row: str, at) -> str:
    """The key of ``row``'s cell at ``at`` (samples per class, or a training set)."""
    return f"{row}|{at}"


def split_key(cell_key: str) -> tuple[str, str]:
    """(row, at) of a cell's key."""
    row, _, at = cell_key.rpartition("|")
    return row, at


#: The budget check of the robustness section: CE at twice its epochs.
DOUBLED_EPOCHS = twice_epochs(CE)
