#!/usr/bin/env bash
# Evidence for issue 55 (part 4): `jacmatch tune` chooses FM+JM's values (lr, τ, γ, mixup α) on
# Fashion-MNIST's validation split at n = 10 samples per class, within 24 trials (complete or
# pruned; a trial is pruned only after its patience in evaluations), with the Jacobian term every
# 4 steps (REPORT §2e); then `jacmatch distill --config best.yaml` trains the best values with
# seeds 0-4. Two workers may share the study, then the seeds (best.yaml is final only once both
# have finished their trials):
#   SEEDS= bash results/tune/run.sh & SEEDS= bash results/tune/run.sh; wait
#   SEEDS="0 2 4" bash results/tune/run.sh & SEEDS="1 3" bash results/tune/run.sh; wait
# The study lives in results/tune/fmjm_n10.db (committed), so the next part continues it: a
# trial cut by the end of a part is failed after its heartbeat and retried (from its folder
# when runs/ still holds it). Each part copies the study's table, summary, best values and
# plot here, and each seed's results.json as results/tune/best_s<S>.json.
#   bash results/tune/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
JACMATCH=${JACMATCH:-.venv/bin/jacmatch}
OUT=runs/tune/fmjm_n10
"$JACMATCH" tune --recipe fm+jm --teacher results/teachers/fmnist_resnet20.pt --dataset fashion-mnist \
  --samples-per-class 10 --trials 24 --out "$OUT" --storage sqlite:///results/tune/fmjm_n10.db --study fmjm_n10 \
  --set objective.jacobian_every=4 --set progress=false
cp "$OUT/tune.json" "$OUT/trials.csv" "$OUT/best.yaml" results/tune/
[ -f "$OUT/history.png" ] && cp "$OUT/history.png" results/tune/
for seed in ${SEEDS-0 1 2 3 4}; do  # SEEDS= (set, empty): the study only
  record=results/tune/best_s${seed}.json
  out=runs/tune/best_s${seed}
  [ -f "$record" ] && continue
  again=(--overwrite)
  [ -f "$out/last.pt" ] && again=(--resume)
  "$JACMATCH" distill --config results/tune/best.yaml --seed "$seed" --out "$out" --set progress=false "${again[@]}"
  cp "$out/results.json" "$record"
done
