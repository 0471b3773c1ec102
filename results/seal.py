"""One-time migration (issue 57, case 17): give every committed result file and run record
that the report and the experiments read the checksum that jacmatch now writes with them
(``record_sha256``), so that a hand edit of the committed evidence is refused from now on.
Each file is read as it is and written back with its checksum added, nothing else changed.

    .venv/bin/python results/seal.py
"""

from __future__ import annotations

import json
from pathlib import Path

from jacmatch.experiments.common import RECORD_SUM, read_json, write_result

ROOT = Path(__file__).resolve().parent


def main() -> None:
    sealed = 0
    for path in sorted([*ROOT.glob("paper/*.json"), *ROOT.glob("paper/runs/*/*.json")]):
        value = read_json(path)  # refuses a file that is cut, holds NaN, or fails a checksum it has
        if RECORD_SUM not in value:
            write_result(path, value)
            sealed += 1
        assert json.loads(path.read_text())[RECORD_SUM]
    print(f"{sealed} files sealed")


if __name__ == "__main__":
    main()
