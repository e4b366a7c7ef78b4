#!/usr/bin/env bash
# The second seed sweep behind docs/gca.md, "Learning to retrieve reliably": the recipe that
# came out of the first sweep (sweep_h200.sh), 10 seeds, with the old recipe's seeds 5-9 and
# four more settings beside it, 2 seeds each; then every run's held-out passkey eval.
#   new          longreach/configs/gca-tiny.yaml                       seeds 0-9
#   v1           benchmarks/gca_retrieval/gca-tiny-v1.yaml             seeds 5-9 (0-4: first sweep)
#   swa          longreach/configs/swa-tiny.yaml (the same data and steps)   seed 0
#   new-win32    sliding window 32 instead of 64 (HSA-UltraLong: the window vs extrapolation)
#   new-gumbel0  no Gumbel noise on the retrieval scores during training
#   new-lr1e-3   learning rate 1e-3 (min 1e-4) instead of 3e-3
#   new-few      the training prompts of the first sweep (4 instructions, 4 needles,
#                3 questions) instead of the composed family; needs FEW_PROMPTS (below)
# Usage (from the repository root):
#   git show 0ccf161:longreach/data/prompts.py > /tmp/few_prompts.py
#   FEW_PROMPTS=/tmp/few_prompts.py bash benchmarks/gca_retrieval/sweep2_h200.sh OUT [MINUTES]
# Every run writes OUT/<name>/{train.log,metrics.jsonl,config.yaml,final/}; MINUTES (default
# 15) caps each training's wall time (train.max_time_minutes: it saves and writes final/).
# Then each run's final/ is evaluated on held-out phrasings in the held-out haystack at 512
# and 8K tokens, 20 prompts each (OUT/<name>/eval-heldout/summary.json), and
#   python benchmarks/gca_retrieval/summarize.py OUT --md OUT/table.md
# makes the table. SETS (default "new v1 swa win32 gumbel0 lr few") picks the groups to run;
# EVAL=0 skips the evals (run them later from the saved final/ folders).
set -u
SETS=" ${SETS:-new v1 swa win32 gumbel0 lr few} "
want() { [[ "$SETS" == *" $1 "* ]]; }
OUT=${1:?usage: sweep2_h200.sh OUT [MINUTES]}
MINUTES=${2:-15}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
# tokenize the corpus once, before 24 processes want the cache at the same moment
$PY -c "from longreach.data import build_token_cache, load_tokenizer; build_token_cache('builtin', load_tokenizer('byte'), val_fraction=0.01, progress=False)"

launch() {  # launch NAME CONFIG OVERRIDES...   (from the current directory's longreach)
  local name=$1 config=$2; shift 2
  mkdir -p "$OUT/$name"
  setsid $PY -m longreach train --config "$config" "$@" "train.out_dir=$OUT/$name" \
      "train.max_time_minutes=$MINUTES" > "$OUT/$name/train.log" 2>&1 < /dev/null &
}

WIN32='model.mixers=[{type: swa, window: 32, position: rope}, {type: swa, window: 32, position: rope}, {type: gca, window: 32, position: rope}, {type: gca, window: 32, position: rope}]'
want new && for s in 0 1 2 3 4 5 6 7 8 9; do launch "new-seed$s" gca-tiny "seed=$s"; done
want v1 && for s in 5 6 7 8 9; do
  launch "v1-seed$s" benchmarks/gca_retrieval/gca-tiny-v1.yaml "seed=$s"
done
want swa && launch swa-seed0 swa-tiny seed=0
for s in 0 1; do
  want win32 && launch "new-win32-seed$s" gca-tiny "seed=$s" "$WIN32"
  want gumbel0 && launch "new-gumbel0-seed$s" gca-tiny "seed=$s" model.gca.gumbel_scale=0
  want lr && launch "new-lr1e-3-seed$s" gca-tiny "seed=$s" train.lr=1e-3 train.min_lr=1e-4
done
if want few && [ -n "${FEW_PROMPTS:-}" ]; then
  # the same package with the first sweep's prompts.py swapped in, run from a copy
  SRC=$(mktemp -d)
  cp -r longreach "$SRC/" && cp "$FEW_PROMPTS" "$SRC/longreach/data/prompts.py"
  (cd "$SRC" && for s in 0 1; do launch "new-few-seed$s" gca-tiny "seed=$s"; done)
fi
wait

[ "${EVAL:-1}" = 0 ] && exit 0
for run in "$OUT"/*/; do
  [ -f "$run/final/config.json" ] || { echo "no final model in $run" >&2; continue; }
  setsid $PY -m longreach eval passkey --model "$run/final" --lengths 512,8k \
      --depths 0,0.25,0.5,0.75,1 --samples 4 --split heldout --haystack heldout \
      --dtype float32 --quiet --out "$run/eval-heldout" > "$run/eval.log" 2>&1 < /dev/null &
done
wait
