"""``jacmatch bench --only data``: what reading a user's data costs, measured in one run.

Three figures, each against its target (BENCHMARKS.md):

- a KD + JM epoch over a folder of Fashion-MNIST PNGs against the same epoch from the
  same images in memory (the loader's default workers), target at most 1.2×;
- the peak resident memory of a run over an image folder and over an .npz memmap of 6,000
  and of 60,000 images (of the largest of the run's processes: itself or a DataLoader
  worker), target: the larger set at most 100 MiB above the smaller;
- the share of a default ``jacmatch distill`` run on Fashion-MNIST spent in evaluation,
  target at most 25%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import torch

from ..atomic import write_json_atomic
from ..training import config_from_dict, train
from .markdown import format_data
from ..experiments.common import machine_record

__all__ = ["run_data_bench", "main"]

TEACHER = Path(__file__).resolve().parents[2] / "results" / "teachers" / "fmnist_resnet20.pt"


def _fashion(n_train: int, n_test: int):
    from ..data import create_dataset
    d = create_dataset("fashion-mnist", val_size=0)
    return (d.train.images[:n_train, 0].numpy(), d.train.labels[:n_train].numpy(),
            d.test.images[:n_test, 0].numpy(), d.test.labels[:n_test].numpy())


def write_png_folder(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    from PIL import Image
    for c in np.unique(y):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i, (a, c) in enumerate(zip(x, y)):
        Image.fromarray(a).save(root / f"class_{c}" / f"{i:06d}.png")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def _peak_mib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) // 1024
    except (OSError, IndexError):
        return None


def _child(args: list[str], env: dict) -> dict:
    """One jacmatch command in a fresh process: its wall time and the peak resident memory
    (VmHWM, polled every 50 ms) of the run's process and of its largest DataLoader worker.
    (``getrusage``'s children figure is not used: a forked worker inherits its parent's
    high-water mark, so it reports the parent's peak at fork plus the worker's own.)"""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jacmatch", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    main_peak, worker_peak = 0, 0
    while proc.poll() is None:
        main_peak = max(main_peak, _peak_mib(proc.pid) or 0)
        worker_peak = max([worker_peak] + [_peak_mib(k) or 0 for k in _children(proc.pid)])
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"jacmatch {' '.join(args)} failed: {proc.stderr.read()[-1000:]}")
    return {"seconds": time.time() - start, "peak_mib": main_peak, "worker_peak_mib": worker_peak}


def _epoch_ratio(work: Path, n: int) -> dict:
    """The median of epochs 2-5 (the first fills the teacher cache, so the later ones are the
    cheapest steps: the worst case for the loader) over PNGs and over the same images in memory."""
    x, y, tx, ty = _fashion(n, max(n // 6, 20))
    write_png_folder(work / "fm" / "train", x, y)
    write_png_folder(work / "fm" / "test", tx, ty)
    np.savez(work / "fm.npz", train_images=x[:, None], train_labels=y, test_images=tx[:, None], test_labels=ty)
    common = {"teacher": str(TEACHER), "optim": {"epochs": 5}, "progress": False,
              "eval": {"noise_sigmas": [], "jacobian_cosine": False}}  # what `jacmatch distill` trains
    seconds = {}
    # the same images held in memory (the built-in path), then read from the PNG files
    for name, spec in (("memory", _register_in_memory(work / "fm.npz")), ("folder", str(work / "fm"))):
        out = work / f"epoch_{name}"
        train(config_from_dict({**common, "data": {"name": spec}, "out_dir": str(out)}))
        epochs = [json.loads(line)["epoch_seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds[name] = float(np.median(epochs[1:]))
    return {"images": n, "epoch_seconds": seconds, "ratio": seconds["folder"] / seconds["memory"], "target": 1.2}


def _register_in_memory(npz: Path) -> str:
    from ..data import register_dataset
    from ..data.datasets import ImageSet
    a = np.load(npz)
    sets = (ImageSet(torch.from_numpy(a["train_images"]), torch.from_numpy(a["train_labels"].astype(np.int64))),
            ImageSet(torch.from_numpy(a["test_images"]), torch.from_numpy(a["test_labels"].astype(np.int64))))
    register_dataset("bench-in-memory", lambda d, dl: (*sets, 10, False))
    return "bench-in-memory"


def _memory(work: Path, sizes: tuple[int, int], env: dict) -> dict:
    x, y, tx, ty = _fashion(max(sizes), 1000)
    rows = {}
    for n in sizes:
        folder, npz = work / f"mem_{n}", work / f"mem_{n}.npz"
        write_png_folder(folder / "train", x[:n], y[:n])
        write_png_folder(folder / "test", tx, ty)
        np.savez(npz, train_images=x[:n, None], train_labels=y[:n], test_images=tx[:, None], test_labels=ty)
        for kind, spec in (("folder", str(folder)), ("npz", f"npz:{npz}")):
            rows[f"{kind}_{n}"] = _child(["train-teacher", "--dataset", spec, "--model", "small_cnn_8",
                                          "--set", "data.samples_per_class=20", "--set", "optim.epochs=1",
                                          "--set", "progress=false", "--out", str(work / f"run_{kind}_{n}")], env)
    small, large = sizes
    largest = lambda r: max(r["peak_mib"], r["worker_peak_mib"])  # noqa: E731
    growth = {k: largest(rows[f"{k}_{large}"]) - largest(rows[f"{k}_{small}"]) for k in ("folder", "npz")}
    return {"sizes": list(sizes), "runs": rows, "growth_mib": growth, "target_mib": 100}


def _evaluation_share(work: Path, quick: bool) -> dict:
    """A default distill run on Fashion-MNIST (quick: a few-sample one), from results.json."""
    args = ["distill", "--dataset", "fashion-mnist", "--teacher", str(TEACHER), "--set", "progress=false",
            "--out", str(work / "default_distill")]
    if quick:
        args += ["--samples-per-class", "5", "--set", "optim.epochs=2"]
    values = {"data": {"name": "fashion-mnist", "samples_per_class": 5 if quick else None}, "teacher": str(TEACHER),
              "progress": False, "out_dir": str(work / "default_distill"), "optim": {"epochs": 2} if quick else {}}
    train(config_from_dict(values))  # what `args` runs, trained in this process
    r = json.loads((work / "default_distill" / "results.json").read_text())
    total = r["loop_seconds"] + r["eval_seconds"]
    shown = [a for a in args if not a.startswith(str(work))]
    shown.remove("--out")
    return {"command": "jacmatch " + " ".join(shown).replace(str(TEACHER.parents[2]) + "/", ""),
            "train_seconds": r["loop_seconds"], "eval_seconds": r["eval_seconds"], "share": r["eval_seconds"] / total,
            "target": 0.25}


def run_data_bench(quick: bool = False) -> dict:
    env = dict(os.environ)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="jacmatch-bench-data-") as tmp:
        work = Path(tmp)
        results = {"quick": quick,
                   "epoch": _epoch_ratio(work, 600 if quick else 6000),
                   "memory": _memory(work, (600, 1200) if quick else (6000, 60000), env),
                   "evaluation": _evaluation_share(work, quick)}
    results["machine"] = machine_record(torch.device("cpu"))
    results["bench_seconds"] = time.time() - start
    return results


def main(json_path: str | None, quick: bool = False) -> dict:
    results = run_data_bench(quick)
    print("\n".join(format_data(results)))
    if json_path:
        write_json_atomic(json_path, results)
    return results
