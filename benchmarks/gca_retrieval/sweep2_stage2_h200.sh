#!/usr/bin/env bash
# The second stage of the second sweep (docs/gca.md, "Learning to retrieve reliably"): every
# seed of sweep2_h200.sh's `new` runs and its sliding-window run, trained again with the same
# recipe from their final weights at a lower learning rate (1e-3 -> 1e-4: longreach.demo's
# SECOND_STAGE), plus two from-scratch runs with the answer tokens weighted 16x instead of 8x.
#   cont-seedS       gca-tiny, --init-from STAGE1/new-seedS/final          seeds 0-9
#   cont-swa-seed0   swa-tiny, --init-from STAGE1/swa-seed0/final
#   lw16-seedS       gca-tiny from scratch, data.synthetic.loss_weight=16  seeds 0-1
# Usage (from the repository root, after sweep2_h200.sh STAGE1 with SETS including new, swa):
#   bash benchmarks/gca_retrieval/sweep2_stage2_h200.sh STAGE1 OUT [MINUTES]
#   python benchmarks/gca_retrieval/summarize.py OUT --md OUT/table.md
# MINUTES (default 15) caps each training's wall time (it saves and writes final/).
set -u
STAGE1=${1:?usage: sweep2_stage2_h200.sh STAGE1 OUT [MINUTES]}
OUT=${2:?usage: sweep2_stage2_h200.sh STAGE1 OUT [MINUTES]}
MINUTES=${3:-15}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE1=$(cd "$STAGE1" && pwd)
PY=${PYTHON:-python3}
SECOND="train.lr=1e-3 train.min_lr=1e-4"
$PY -c "from longreach.data import build_token_cache, load_tokenizer; build_token_cache('builtin', load_tokenizer('byte'), val_fraction=0.01, progress=False)"

launch() {  # launch NAME CONFIG OVERRIDES...
  local name=$1 config=$2; shift 2
  mkdir -p "$OUT/$name"
  setsid $PY -m longreach train --config "$config" "$@" "train.out_dir=$OUT/$name" \
      "train.max_time_minutes=$MINUTES" > "$OUT/$name/train.log" 2>&1 < /dev/null &
}
for s in 0 1 2 3 4 5 6 7 8 9; do
  if [ -f "$STAGE1/new-seed$s/final/config.json" ]; then
    # shellcheck disable=SC2086
    launch "cont-seed$s" gca-tiny "seed=$s" "train.init_from=$STAGE1/new-seed$s/final" $SECOND
  else
    echo "no final model in $STAGE1/new-seed$s: cont-seed$s skipped" >&2
  fi
done
# shellcheck disable=SC2086
[ -f "$STAGE1/swa-seed0/final/config.json" ] && \
  launch cont-swa-seed0 swa-tiny seed=0 "train.init_from=$STAGE1/swa-seed0/final" $SECOND
for s in 0 1; do launch "lw16-seed$s" gca-tiny "seed=$s" data.synthetic.loss_weight=16; done
wait
