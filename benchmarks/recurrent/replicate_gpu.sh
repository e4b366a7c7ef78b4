#!/usr/bin/env bash
# Several runs of study_gpu.sh side by side on one GPU, sharing one corpus, from the
# repository root:
#   bash benchmarks/recurrent/replicate_gpu.sh ROOT
# RUNS lists the runs as NAME:MINUTES:OVERRIDES[:CONDITION] (OVERRIDES comma-separated, added
# to every training of that run: a seed, a recipe field; CONDITION one of study_gpu.sh's, by
# default $CONDITION, itself by default slowest-256, the one that broke in the third run). The default: two more seeds of
# that run, and a run of half its pre-training minutes (does the failure grow with tokens?).
# ROOT/shared/data holds the shared corpus (built first, alone); ROOT/NAME is each run's WORK folder
# (its study.log and results.tar.xz); ROOT/replicate.log says what ran when. Other settings
# of study_gpu.sh (POST_STEPS, PPL_SAMPLES, EXTRA is replaced) pass through the environment.
set -u
ROOT=${1:?usage: replicate_gpu.sh ROOT}
RUNS=${RUNS:-"seed1:4:seed=1 seed2:4:seed=2 half:2:seed=0"}
CONDITION=${CONDITION:-slowest-256}
SCRIPT=$(dirname "$0")/study_gpu.sh
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
LOG=$ROOT/replicate.log
stamp() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

read -r -a ENTRIES <<< "$RUNS"
for entry in "${ENTRIES[@]}"; do  # refuse a malformed entry before anything runs
  IFS=: read -r name minutes overrides condition <<< "$entry"
  if [ -z "$name" ] || ! [[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "replicate_gpu.sh: RUNS entry '$entry' is not NAME:MINUTES:OVERRIDES[:CONDITION]" >&2
    exit 2
  fi
  if ! grep -q "^  \[${condition:-$CONDITION}\]=" "$SCRIPT"; then
    echo "replicate_gpu.sh: RUNS entry '$entry': no condition '${condition:-$CONDITION}' in $SCRIPT" >&2
    exit 2
  fi
done

stamp "the shared corpus, tokenizer and token cache in $ROOT/shared/data"
STOP_AFTER=data SKIP_TESTS=1 bash "$SCRIPT" "$ROOT/shared" >> "$LOG" 2>&1 \
  || { stamp "the corpus failed (see $ROOT/shared/study.log)"; exit 1; }

PIDS=()
for entry in "${ENTRIES[@]}"; do
  IFS=: read -r name minutes overrides condition <<< "$entry"
  condition=${condition:-$CONDITION}
  mkdir -p "$ROOT/$name"
  [ -e "$ROOT/$name/data" ] || ln -s ../shared/data "$ROOT/$name/data"
  stamp "run $name: $condition for $minutes minutes, overrides: ${overrides:-none}"
  EXTRA="${overrides//,/ }" CONDITION_ORDER="$condition" SKIP_TESTS=1 BENCH=0 \
    bash "$SCRIPT" "$ROOT/$name" "$minutes" > "$ROOT/$name.out" 2>&1 < /dev/null &
  PIDS+=($!)
done
status=0
for i in "${!PIDS[@]}"; do
  wait "${PIDS[$i]}" || status=1
  IFS=: read -r name _ <<< "${ENTRIES[$i]}"
  stamp "run $name: $(grep '^\[' "$ROOT/$name/study.log" | tail -1)"
done
stamp "done"
exit $status
