#!/usr/bin/env bash
# Issue 57, case 8: 1 and 2 processes with the teacher cache and output projections, in the
# issue's setup (Fashion-MNIST, a 1-epoch small_cnn_8 teacher, a lenet5 student at n = 20,
# beta = gamma = 1, jm_outputs=projection, 3 epochs, batch 64). Prints the largest weight gap.
#   bash results/checks/ddp_cache_projection.sh [WORKDIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
W=${1:-runs/checks/ddp_cache_projection}
mkdir -p "$W" && cd "$W"
export OMP_NUM_THREADS=1
[ -f t/last.pt ] || "$PY" -m jacmatch train-teacher --dataset fashion-mnist --model small_cnn_8 --set optim.epochs=1 \
  --set progress=false --out t --overwrite > t.log 2>&1
C=(--recipe none --teacher t/last.pt --dataset fashion-mnist --model lenet5 --samples-per-class 20
   --set objective.beta=1 --set objective.gamma=1 --set objective.jm_outputs=projection --set optim.epochs=3
   --set optim.batch_size=64 --set progress=false --set "eval.noise_sigmas=[]" --set eval.jacobian_cosine=false
   --set eval.fidelity=false)
"$PY" -m jacmatch distill "${C[@]}" --out one --overwrite > one.log 2>&1
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m jacmatch distill "${C[@]}" --out two --overwrite \
  > two.log 2>&1
"$PY" - <<'P'
import json
from jacmatch.training.checkpoint import load_checkpoint
a, b = load_checkpoint("one/last.pt")["model"], load_checkpoint("two/last.pt")["model"]
caches = [json.load(open(f"{d}/results.json")).get("teacher_cache", {}).get("sha256") for d in ("one", "two")]
print(f"largest weight gap, 1 vs 2 processes: {max(float((a[k].float() - b[k].float()).abs().max()) for k in a):.3e}; "
      f"teacher caches equal: {caches[0] == caches[1]}")
P
