#!/usr/bin/env bash
# The second stage of gca-small and swa-small (docs/results.md, "Training"): both recipes
# again from their first stage's weights, with half the rows passkey prompts instead of a
# quarter and the learning rate at 1e-3 decaying to 1e-4 (what gave the tiny recipe its
# copying: docs/gca.md, "The second sweep"), side by side on one GPU. From the repo root:
#   bash benchmarks/gca_small/stage2_h200.sh OUT STAGE1 STEPS [MINUTES] [WORKERS]
# STAGE1 holds gca-small-bf16/ and swa-small-bf16/ (train_h200.sh's exports) and
# bpe-8k/ (the tokenizer they were trained with); the corpus is rebuilt if absent.
# EXTRA: more overrides, after these (e.g. EXTRA="data.synthetic.fraction=1.0" for a passkey
# fine-tune, as the paper's needle numbers come after one).
# RECIPES (default "gca-small swa-small") picks the runs (one at a time also works).
# Writes OUT/<recipe>/{train.log,metrics.jsonl,config.yaml,final/} and OUT/<recipe>-bf16/.
set -eu
OUT=${1:?usage: stage2_h200.sh OUT STAGE1 STEPS [MINUTES] [WORKERS]}
STAGE1=${2:?STAGE1 folder}
STEPS=${3:?STEPS}
MINUTES=${4:-4.5}
WORKERS=${5:-6}
PY=${PYTHON:-python3}
RECIPES=${RECIPES:-gca-small swa-small}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stamp() { echo "[$(date +%T)] $*"; }

stamp "corpus"
[ -f data/pycode/train.jsonl.gz ] || $PY -m longreach corpus build-pycode --out data/pycode
mkdir -p data/pycode/bpe-8k && cp "$STAGE1"/bpe-8k/* data/pycode/bpe-8k/
stamp "token cache"
$PY -c "
from longreach.data import build_token_cache, load_tokenizer
build_token_cache('data/pycode/train.jsonl.gz', load_tokenizer('data/pycode/bpe-8k'),
                  val_fraction=0.03, progress=False)
"
stamp "stage 2: $STEPS steps each"
for recipe in $RECIPES; do
  mkdir -p "$OUT/$recipe"
  setsid $PY -m longreach train --config $recipe --init-from "$STAGE1/$recipe-bf16" \
      "data.workers=$WORKERS" data.synthetic.fraction=0.5 train.lr=1e-3 train.min_lr=1e-4 \
      train.warmup_steps=50 "train.steps=$STEPS" "train.max_time_minutes=$MINUTES" \
      "train.out_dir=$OUT/$recipe" ${EXTRA:-} > "$OUT/$recipe/train.log" 2>&1 < /dev/null &
done
wait
stamp "bf16 export"
for recipe in $RECIPES; do
  $PY - "$OUT/$recipe/final" "$OUT/$recipe-bf16" <<'PY'
import sys, torch, longreach  # noqa: F401  (registers the model classes)
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1:]
AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(
    dst, max_shard_size="14MB")
PY
  cp "$OUT/$recipe/final"/tokenizer* "$OUT/$recipe-bf16/"
done
stamp "done"
