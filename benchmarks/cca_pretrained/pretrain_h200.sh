#!/usr/bin/env bash
# "The user's pretrained model" of docs/cca.md: llama-small (a transformers LlamaForCausalLM)
# pre-trained at 8K tokens on the code corpus, on one GPU. From the repository root:
#   bash benchmarks/cca_pretrained/pretrain_h200.sh WORK [MINUTES] [WORKERS]
# 1. builds the corpus in WORK/data/pycode (longreach corpus build-pycode) and its BPE-8K
#    tokenizer (or copies the folder $BPE when given: the tokenizer of the gca-small runs),
#    and tokenizes the train split once;
# 2. trains CALIB_STEPS (60) steps to measure tokens/s, then sets train.steps so that the run
#    takes about MINUTES (default 7) of training (the schedule ends where the run ends);
# 3. writes WORK/llama-small/{train.log,metrics.jsonl,config.yaml,final/} and
#    WORK/llama-small-bf16/ (the final weights in bf16, shards of <= 14 MB, with the tokenizer).
set -eu
WORK=${1:?usage: pretrain_h200.sh WORK [MINUTES] [WORKERS]}
MINUTES=${2:-7}
WORKERS=${3:-6}
CALIB_STEPS=${CALIB_STEPS:-60}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA=$WORK/data/pycode
stamp() { echo "[$(date +%T)] $*"; }

stamp "corpus"
[ -f "$DATA/train.jsonl.gz" ] || $PY -m longreach corpus build-pycode --out "$DATA"
stamp "tokenizer"
if [ ! -f "$DATA/bpe-8k/tokenizer.json" ]; then
  if [ -n "${BPE:-}" ]; then cp -r "$BPE" "$DATA/bpe-8k"
  else $PY -m longreach tokenizer train --corpus "$DATA/train.jsonl.gz" --vocab-size 8192 \
      --max-chars 100000000 --out "$DATA/bpe-8k"; fi
fi
stamp "token cache"
$PY -c "
from longreach.data import build_token_cache, load_tokenizer
c = build_token_cache('$DATA/train.jsonl.gz', load_tokenizer('$DATA/bpe-8k'),
                      val_fraction=0.03, progress=False)
print({k: c.meta[k] for k in ('n_train_documents', 'n_val_documents', 'n_train_tokens', 'n_val_tokens')})
"
COMMON=("data.source=$DATA/train.jsonl.gz" "data.tokenizer=$DATA/bpe-8k" "data.workers=$WORKERS")

stamp "calibration: $CALIB_STEPS steps"
mkdir -p "$WORK/llama-small-calib"
$PY -m longreach train --config llama-small "${COMMON[@]}" "train.steps=$CALIB_STEPS" \
    train.log_every=20 train.eval_every=0 train.save_every=0 train.warmup_steps=10 \
    "train.out_dir=$WORK/llama-small-calib" > "$WORK/llama-small-calib/train.log" 2>&1 < /dev/null
STEPS=$($PY - "$WORK" "$MINUTES" <<'PY'
import json, sys
work, minutes = sys.argv[1], float(sys.argv[2])
rows = [json.loads(line) for line in open(f"{work}/llama-small-calib/metrics.jsonl")]
rate = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]
print(int(rate * minutes * 60 / (8 * 8192)))  # one step is batch 8 x 8,192 tokens
PY
)
stamp "training: $STEPS steps"
mkdir -p "$WORK/llama-small"
$PY -m longreach train --config llama-small "${COMMON[@]}" "train.steps=$STEPS" \
    "train.max_time_minutes=$(awk "BEGIN {print $MINUTES + 1}")" \
    "train.out_dir=$WORK/llama-small" > "$WORK/llama-small/train.log" 2>&1 < /dev/null

stamp "bf16 export"
$PY - "$WORK/llama-small/final" "$WORK/llama-small-bf16" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
model.save_pretrained(dst, max_shard_size="14MB")
PY
cp "$WORK/llama-small/final"/tokenizer* "$WORK/llama-small-bf16/"
stamp "done"
