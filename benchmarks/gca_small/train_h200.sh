#!/usr/bin/env bash
# gca-small and swa-small trained side by side on one GPU, from nothing but this machine's
# installed Python packages (docs/results.md, "Training"). From the repository root:
#   bash benchmarks/gca_small/train_h200.sh OUT [MINUTES] [WORKERS]
# 1. builds the corpus (data/pycode) and its BPE-8K tokenizer, and tokenizes the train split
#    once (both runs then share the cache);
# 2. trains both recipes for CALIB_STEPS (100) steps at once to measure their tokens/s side by
#    side over the last 25 (with 30 steps, as first run, the two measuring windows hardly
#    overlapped: each run measured the GPU alone, 2x too fast, and the runs took 6 minutes),
#    then sets train.steps so that each run takes about MINUTES (default 6) of training, so
#    the learning-rate schedule ends where the run ends (train.max_time_minutes is only a cap);
# 3. writes OUT/<recipe>/{train.log,metrics.jsonl,config.yaml,final/} and OUT/<recipe>-bf16/
#    (the final weights in bf16, safetensors shards of <= 14 MB, with the tokenizer).
# WORKERS (default 6) is data.workers: processes building the passkey prompts ahead.
set -eu
OUT=${1:?usage: train_h200.sh OUT [MINUTES] [WORKERS]}
MINUTES=${2:-6}
WORKERS=${3:-6}
CALIB_STEPS=${CALIB_STEPS:-100}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stamp() { echo "[$(date +%T)] $*"; }

stamp "corpus"
[ -f data/pycode/train.jsonl.gz ] || $PY -m longreach corpus build-pycode --out data/pycode
stamp "tokenizer"
[ -f data/pycode/bpe-8k/tokenizer.json ] || $PY -m longreach tokenizer train \
    --corpus data/pycode/train.jsonl.gz --vocab-size 8192 --max-chars 100000000 \
    --out data/pycode/bpe-8k
stamp "token cache"
$PY -c "
from longreach.data import build_token_cache, load_tokenizer
c = build_token_cache('data/pycode/train.jsonl.gz', load_tokenizer('data/pycode/bpe-8k'),
                      val_fraction=0.03, progress=False)
print({k: c.meta[k] for k in ('n_train_documents', 'n_val_documents', 'n_train_tokens', 'n_val_tokens')})
"

train_both() {  # train_both TAG OVERRIDES...: both recipes at once, into OUT/<recipe><TAG>
  local tag=$1; shift
  for recipe in gca-small swa-small; do
    mkdir -p "$OUT/$recipe$tag"
    setsid $PY -m longreach train --config $recipe "data.workers=$WORKERS" "$@" \
        "train.out_dir=$OUT/$recipe$tag" > "$OUT/$recipe$tag/train.log" 2>&1 < /dev/null &
  done
  wait
}

stamp "calibration: $CALIB_STEPS steps of each, side by side"
train_both -calib "train.steps=$CALIB_STEPS" train.log_every=25 train.eval_every=0 \
    train.save_every=0 train.probe_every=0 train.warmup_steps=10
STEPS=$($PY - "$OUT" "$MINUTES" <<'PY'
import json, sys
out, minutes = sys.argv[1], float(sys.argv[2])
rates = []
for recipe in ("gca-small", "swa-small"):
    rows = [json.loads(line) for line in open(f"{out}/{recipe}-calib/metrics.jsonl")]
    rates.append([r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1])
# one step is batch 16 x 4,096 tokens; the slower run (GCA) sets the common step count
print(int(min(rates) * minutes * 60 / (16 * 4096)))
PY
)
stamp "training: $STEPS steps each"
train_both "" "train.steps=$STEPS" "train.max_time_minutes=$(awk "BEGIN {print $MINUTES + 1}")"

stamp "bf16 export"
for recipe in gca-small swa-small; do
  $PY - "$OUT/$recipe/final" "$OUT/$recipe-bf16" <<'PY'
import sys, torch, longreach  # noqa: F401  (registers the model classes)
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
model.save_pretrained(dst, max_shard_size="14MB")
PY
  cp "$OUT/$recipe/final"/tokenizer* "$OUT/$recipe-bf16/"
done
stamp "done"
