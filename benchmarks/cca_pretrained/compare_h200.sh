#!/usr/bin/env bash
# docs/cca.md's comparison on one GPU: the five fine-tunes of finetune_h200.sh side by side,
# then every model evaluated on held-out packages, then the decode benchmark. From the
# repository root, after pretrain_h200.sh:
#   bash benchmarks/cca_pretrained/compare_h200.sh WORK MODEL
# WORK holds data/pycode; MODEL is the pretrained llama-small folder. Writes WORK/ft-*/,
# WORK/eval/<model>-<task>/ and WORK/plugin_decode.json.
# Zero-shot rows (the plug-in on the pretrained weights) are evaluated while the fine-tunes
# train; the fine-tuned ones after; the benchmark runs alone on the GPU at the end.
set -u
WORK=${1:?usage: compare_h200.sh WORK MODEL}
MODEL=${2:?usage: compare_h200.sh WORK MODEL}
PY=${PYTHON:-python3}
HELD=$WORK/data/pycode/heldout.jsonl.gz
EVAL=$WORK/eval
mkdir -p "$EVAL"
stamp() { echo "[$(date +%T)] $*"; }

stamp "corpus and token cache"
[ -f "$WORK/data/pycode/train.jsonl.gz" ] || $PY -m longreach corpus build-pycode --out "$WORK/data/pycode"
$PY -c "
from longreach.data import build_token_cache, load_tokenizer
build_token_cache('$WORK/data/pycode/train.jsonl.gz', load_tokenizer('$MODEL'), val_fraction=0.03,
                  progress=False)"

stamp "fine-tunes"
MINUTES=${MINUTES:-3.5} bash benchmarks/cca_pretrained/finetune_h200.sh "$WORK" "$MODEL" 2 &
TUNES=$!

# evaluate NAME FOLDER ATTENTION-ARGS...: ppl at 2K/4K/8K, passkey with held-out and with
# training phrasings (both in held-out packages) at 1K-8K, depths 0 / 0.5 / 1
evaluate() {
  local name=$1 folder=$2; shift 2
  for task in ppl passkey-heldout passkey-train; do
    case $task in
      ppl) args=(ppl --lengths 2k,4k,8k --samples 8 --bucket 1k) ;;
      passkey-heldout) args=(passkey --split heldout --lengths 1k,2k,4k,8k --depths 0,0.5,1 --samples 7) ;;
      passkey-train) args=(passkey --split train --lengths 1k,2k,4k,8k --depths 0,0.5,1 --samples 7) ;;
    esac
    timeout 300 $PY -m longreach eval "${args[@]}" --model "$folder" --haystack "$HELD" \
        --out "$EVAL/$name-$task" --quiet "$@"
  done > "$EVAL/$name.log" 2>&1
}
variants() {  # variants PREFIX FOLDER-OF(NAME): the five attentions
  evaluate "$1full" "$($2 full)" --attention full &
  evaluate "$1cca-w1024" "$($2 cca-w1024)" --attention cca --window 1024 &
  evaluate "$1cca-w256" "$($2 cca-w256)" --attention cca --window 256 &
  evaluate "$1streaming-w1024" "$($2 streaming-w1024)" --attention streaming --window 1024 &
  evaluate "$1lm-infinite-w1024" "$($2 lm-infinite-w1024)" --attention lm-infinite --window 1024 &
  wait
}
pretrained() { echo "$MODEL"; }
finetuned() { echo "$WORK/ft-$1/final"; }

stamp "zero-shot evals"
variants zs- pretrained
stamp "waiting for the fine-tunes"
wait $TUNES
stamp "fine-tuned evals"
variants ft- finetuned
stamp "decode benchmark"
timeout 240 $PY -m longreach bench plugin-decode --model "$MODEL" --lengths 8k,64k,128k \
    --out "$WORK/plugin_decode.json" > "$WORK/plugin_decode.log" 2>&1
stamp "done"
