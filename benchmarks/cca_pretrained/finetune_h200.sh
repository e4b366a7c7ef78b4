#!/usr/bin/env bash
# The five fine-tunes of docs/cca.md's comparison, side by side on one GPU, from the
# pretrained llama-small. From the repository root:
#   bash benchmarks/cca_pretrained/finetune_h200.sh WORK MODEL [WORKERS]
# WORK holds data/pycode (pretrain_h200.sh); MODEL is the pretrained folder. Writes
# WORK/ft-<name>/ (train.log, metrics.jsonl, final/) for name in full, cca-w1024, cca-w256,
# streaming-w1024, lm-infinite-w1024. Each run stops cleanly after MINUTES (default 6) at most.
set -eu
WORK=${1:?usage: finetune_h200.sh WORK MODEL [WORKERS]}
MODEL=${2:?usage: finetune_h200.sh WORK MODEL [WORKERS]}
WORKERS=${3:-2}
MINUTES=${MINUTES:-6}
PY=${PYTHON:-python3}
DATA=$WORK/data/pycode
run() {  # run NAME ATTENTION OVERRIDES...
  local name=$1 attention=$2; shift 2
  mkdir -p "$WORK/ft-$name"
  setsid $PY -m longreach finetune --model "$MODEL" --attention "$attention" \
      --config cca-finetune-small "data.source=$DATA/train.jsonl.gz" "data.workers=$WORKERS" \
      "train.max_time_minutes=$MINUTES" "train.out_dir=$WORK/ft-$name" "$@" \
      > "$WORK/ft-$name/train.log" 2>&1 < /dev/null &
}
run full full
run cca-w1024 cca model.window=1024
run cca-w256 cca model.window=256
run streaming-w1024 streaming model.window=1024
# dense scores per query block: recompute them in the backward instead of keeping 8 layers
run lm-infinite-w1024 lm-infinite model.window=1024 train.gradient_checkpointing=true
wait
