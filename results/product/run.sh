#!/usr/bin/env bash
# Evidence that the product gives what the report says (issue 55): the command a user types,
# `jacmatch distill` with its default recipe (auto), on Fashion-MNIST with the report's teacher,
# at n = 1, 10 and 100 samples per class, seeds 0-4. Each finished run's results.json is kept as
# results/product/default_n<N>_s<S>.json (committed); a run whose record exists is skipped, and a
# run cut part-way (its folder under runs/product/ holds last.pt) is resumed, so that the next
# part starts from what is committed.
#   bash results/product/run.sh [N ...]       (default: 1 100 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
JACMATCH=${JACMATCH:-.venv/bin/jacmatch}
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 100 10)
for n in "${sizes[@]}"; do
  for seed in 0 1 2 3 4; do
    record=results/product/default_n${n}_s${seed}.json
    out=runs/product/default_n${n}_s${seed}
    [ -f "$record" ] && continue
    again=(--overwrite)
    [ -f "$out/last.pt" ] && again=(--resume)
    "$JACMATCH" distill --teacher results/teachers/fmnist_resnet20.pt --dataset fashion-mnist \
      --samples-per-class "$n" --seed "$seed" --out "$out" --set progress=false "${again[@]}"
    cp "$out/results.json" "$record"
  done
done
