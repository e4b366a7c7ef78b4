#!/usr/bin/env bash
# The seed sweep behind docs/gca.md, "Learning to retrieve reliably": 26 tiny trainings at
# once on one H200 (each a separate process; a tiny model leaves most of the GPU idle).
#   old recipe (gca-tiny-v1.yaml)            seeds 0-4
#   new recipe (longreach/configs/gca-tiny)  seeds 0-9
#   the new recipe with one setting undone   seeds 0-1 each (ablations)
#   the sliding-window baseline on the new data, seed 0
# Usage: bash benchmarks/gca_retrieval/sweep_h200.sh OUT [MINUTES]   (from the repository root)
# Every run writes OUT/<name>/{train.log,metrics.jsonl,config.yaml,final/}. MINUTES (default
# 18) caps each run's wall time (train.max_time_minutes: it saves and writes final/ then).
set -u
OUT=${1:?usage: sweep_h200.sh OUT [MINUTES]}
MINUTES=${2:-18}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# tokenize the corpus once, before 26 processes want the cache at the same moment
$PY -c "from longreach.data import build_token_cache, load_tokenizer; build_token_cache('builtin', load_tokenizer('byte'), val_fraction=0.01, progress=False)"

NEW_DATA='data.synthetic={task: passkey, split: train, fraction: 0.5, min_fraction: 0.6, needles: [1, 3], queries: [1, 2], key_kinds: [digits, word, hex], loss_weight: 8}'
OLD_DATA='data.synthetic={task: passkey, fraction: 0.5, min_fraction: 0.6}'

launch() {  # launch NAME CONFIG OVERRIDES...
  local name=$1 config=$2; shift 2
  mkdir -p "$OUT/$name"
  setsid $PY -m longreach train --config "$config" "$@" "train.out_dir=$OUT/$name" \
      "train.max_time_minutes=$MINUTES" > "$OUT/$name/train.log" 2>&1 < /dev/null &
}

for s in 0 1 2 3 4; do launch "v1-seed$s" benchmarks/gca_retrieval/gca-tiny-v1.yaml "seed=$s"; done
for s in 0 1 2 3 4 5 6 7 8 9; do launch "new-seed$s" gca-tiny "seed=$s"; done
for s in 0 1; do
  launch "new-nobypass-seed$s" gca-tiny "seed=$s" model.gca.bypass=false
  launch "new-top4-seed$s" gca-tiny "seed=$s" model.gca.top_k=4
  launch "new-enc1-seed$s" gca-tiny "seed=$s" model.gca.encoder_layers=1
  launch "new-weight1-seed$s" gca-tiny "seed=$s" data.synthetic.loss_weight=1
  launch "new-olddata-seed$s" gca-tiny "seed=$s" "$OLD_DATA"
done
launch "swa-newdata-seed0" swa-tiny seed=0 train.steps=4500 "$NEW_DATA"
wait
