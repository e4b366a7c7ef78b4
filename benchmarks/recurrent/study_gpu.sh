#!/usr/bin/env bash
# The length-generalization study of docs/recurrent.md on one GPU, from the repository root:
#   bash benchmarks/recurrent/study_gpu.sh WORK [MINUTES]
# 1. the GPU tests of the recurrence kernels (fla-core), then the corpus, its BPE-8K tokenizer
#    and token cache (as gca-small.yaml says);
# 2. pre-trains the mamba2-small conditions of CONDITIONS side by side (one process each on
#    the one GPU), each for about MINUTES (default 7) after a 40-step calibration;
# 3. measures each base model's perplexity by position to 64x its training length on the
#    held-out packages, and the control (the same tokens, each predicted from at most the
#    training length of context: --max-context), and picks the one whose full-context
#    perplexity past 8x its length is highest against its control (none above: the first);
# 4. post-trains that base 500 steps with each train.initial_state, side by side;
# 5. evaluates the base and the five post-trained models: perplexity by position (and its
#    control), passkey
#    in held-out code at 1x-32x with held-out phrasings (and, as a second row, with the
#    training phrasings), Effective Remembrance; one report;
# 6. `longreach bench recurrence` (op and model suites) alone on the GPU at the end.
# Everything lands in WORK (study.log says what ran when; results.tar.xz holds what was measured
# so far, rewritten after each stage); nothing here needs the network.
set -u
WORK=${1:?usage: study_gpu.sh WORK [MINUTES]}
MINUTES=${2:-7}
PY=${PYTHON:-python3}
POST_STEPS=${POST_STEPS:-500}
CALIB_STEPS=${CALIB_STEPS:-40}
WORKERS=${WORKERS:-2}
# samples of the final evaluations (fewer for a smoke test on the CPU)
PPL_SAMPLES=${PPL_SAMPLES:-16}
PASSKEY_SAMPLES=${PASSKEY_SAMPLES:-12}
EFFREM_SAMPLES=${EFFREM_SAMPLES:-8}
# EXTRA: overrides added to every training (a smoke test on CPU: a tiny model, few steps);
# SKIP_TESTS=1 skips the GPU tests; BENCH=0 skips the bench; CALIB_ONLY=1 stops after the
# calibration (a check that every condition trains); STOP_AFTER=data stops after the corpus,
# tokenizer and token cache; STOP_AFTER=base stops after the base
# models' evaluations (WORK/base.txt names the one picked); CONDITION_ORDER="a b" picks conditions
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA=$WORK/data/pycode
LOG=$WORK/study.log
stamp() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
# pack: WORK/results.tar.xz with everything measured so far (no corpus, checkpoints or weights),
# rewritten after every stage so that a run cut short still leaves its results
pack() {  # GNU tar exits 1 when a file changed while read (a log still being written): the
  # archive is complete all the same, so only an exit above 1 keeps the previous one
  (cd "$WORK" && { tar --exclude=./data --exclude='*/checkpoints' --exclude='*.safetensors' \
      --exclude='./results.tar.xz*' --warning=no-file-changed -cJf results.tar.xz.tmp .
    [ $? -le 1 ]; } && mv results.tar.xz.tmp results.tar.xz)
}

# name: overrides (every condition trains the mamba2-small recipe)
declare -A CONDITIONS=(
  [default-256]=""
  [slow-256]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.01 model.mixers.a_max=4"
  [slow-512]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.01 model.mixers.a_max=4 data.seq_len=512 train.batch_size=16"
  [slow-256-state128]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.01 model.mixers.a_max=4 model.mixers.state_size=128"
  # more tokens per parameter (the paper: the failure grows with them): 4 layers of 192, a
  # larger batch, ~10x the tokens per parameter of the others in the same minutes
  [slow-256-small]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.01 model.mixers.a_max=4 model.hidden_size=192 model.num_hidden_layers=4 model.intermediate_size=512 train.batch_size=64"
  # the slowest forgetting the init allows (dt at its 1e-4 floor to 1e-3, A in [0.5, 1]: a
  # head keeps ~1,000-20,000 tokens) at half and at the usual training length, and the slow
  # init at half the length: states past the training length that training never produced
  [slowest-128]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.001 model.mixers.a_min=0.5 model.mixers.a_max=1 data.seq_len=128 train.batch_size=64"
  [slowest-256]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.001 model.mixers.a_min=0.5 model.mixers.a_max=1"
  [slow-128]="model.mixers.dt_min=0.0001 model.mixers.dt_max=0.01 model.mixers.a_max=4 data.seq_len=128 train.batch_size=64"
  # GLA (one decay per key channel), same width and depth; not in the default order (a sixth
  # process on the GPU): CONDITION_ORDER="... gla-256" adds it
  [gla-256]='model.mixers={"type":"gla","num_heads":6,"expand_k":0.5,"expand_v":1.0,"conv_size":4,"chunk_size":64}'
)
ORDER=(${CONDITION_ORDER:-default-256 slow-256 slow-512 slow-256-state128 slow-256-small})
KINDS=(zero random_noise fitted_noise state_passing tbtt)

stamp "corpus, tokenizer, token cache (in the background, on the CPU)"
(
  [ -f "$DATA/train.jsonl.gz" ] || $PY -m longreach corpus build-pycode --out "$DATA" >> "$LOG" 2>&1
  [ -f "$DATA/bpe-8k/tokenizer.json" ] || $PY -m longreach tokenizer train \
      --corpus "$DATA/train.jsonl.gz" --vocab-size 8192 --max-chars 100000000 --out "$DATA/bpe-8k" >> "$LOG" 2>&1
  $PY -c "
from longreach.data import build_token_cache, load_tokenizer
c = build_token_cache('$DATA/train.jsonl.gz', load_tokenizer('$DATA/bpe-8k'), val_fraction=0.03,
                      progress=False)
print({k: c.meta[k] for k in ('n_train_documents', 'n_val_documents', 'n_train_tokens', 'n_val_tokens')})
"
) >> "$LOG" 2>&1 &
CORPUS=$!

if [ "${SKIP_TESTS:-0}" = 1 ]; then
  stamp "GPU tests skipped"
else
stamp "GPU tests of the recurrence kernels"
LONGREACH_TEST_AUTOTUNE=first timeout 420 $PY -m pytest -q -p no:cacheprovider -m gpu \
    tests/ops/test_linear_recurrence_op.py tests/models/test_recurrent_mixers.py -s \
    > "$WORK/gpu_tests.log" 2>&1
stamp "GPU tests: exit $? ($(tail -1 "$WORK/gpu_tests.log"))"
if ! grep -q "passed" "$WORK/gpu_tests.log" || grep -q "failed" "$WORK/gpu_tests.log"; then
  export LONGREACH_KERNELS=linear_recurrence=fla-gla
  stamp "a kernel test failed: training with LONGREACH_KERNELS=$LONGREACH_KERNELS"
fi
fi

wait $CORPUS || { stamp "the corpus failed"; exit 1; }
[ "${STOP_AFTER:-}" = data ] && { stamp "done (STOP_AFTER=data: corpus, tokenizer, token cache)"; exit 0; }
COMMON=("data.source=$DATA/train.jsonl.gz" "data.tokenizer=$DATA/bpe-8k" "data.workers=$WORKERS")

train() {  # out_dir, recipe, then overrides (INIT_FROM: --init-from); in the background
  local out=$1 recipe=$2; shift 2
  mkdir -p "$out"
  $PY -m longreach train --config "$recipe" ${INIT_FROM:+--init-from "$INIT_FROM"} "${COMMON[@]}" "$@" "${EXTRA[@]}" "train.out_dir=$out" \
      > "$out/train.log" 2>&1 < /dev/null &
}

stamp "calibration: $CALIB_STEPS steps of each condition, side by side"
for c in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  train "$WORK/calib/$c" mamba2-small ${CONDITIONS[$c]} "train.steps=$CALIB_STEPS" \
      train.log_every=10 train.eval_every=0 train.save_every=0 train.warmup_steps=10
done
wait
declare -A STEPS
CALIBRATED=()
for c in "${ORDER[@]}"; do
  if [ -f "$WORK/calib/$c/final/config.json" ]; then CALIBRATED+=("$c")
  else stamp "condition $c failed in calibration: $(tail -1 "$WORK/calib/$c/train.log")"; fi
done
[ ${#CALIBRATED[@]} -gt 0 ] || { stamp "no condition trained: stopping"; pack; exit 1; }
ORDER=("${CALIBRATED[@]}")
for c in "${ORDER[@]}"; do
  STEPS[$c]=$($PY - "$WORK/calib/$c/metrics.jsonl" "$MINUTES" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
r = [r for r in rows if "tokens_per_s" in r][-1]
tokens_per_step = r.get("tokens_per_step") or r["tokens"] / r["step"]
print(int(r["tokens_per_s"] * float(sys.argv[2]) * 60 / tokens_per_step))
PY
) || STEPS[$c]=2000
  stamp "condition $c: ${STEPS[$c]} steps"
done
[ "${CALIB_ONLY:-0}" = 1 ] && { stamp "done (calibration only)"; pack; exit 0; }

stamp "pre-training ${#ORDER[@]} conditions side by side (~$MINUTES min)"
for c in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  train "$WORK/pretrain/$c" mamba2-small ${CONDITIONS[$c]} "train.steps=${STEPS[$c]}" \
      "train.warmup_steps=$(( STEPS[$c] / 30 ))" \
      "train.max_time_minutes=$(awk "BEGIN {print $MINUTES + 1.5}")"
done
wait
TRAINED=()
for c in "${ORDER[@]}"; do
  if [ -f "$WORK/pretrain/$c/final/config.json" ]; then TRAINED+=("$c")
  else stamp "condition $c failed: $(tail -1 "$WORK/pretrain/$c/train.log")"; fi
done
[ ${#TRAINED[@]} -gt 0 ] || { stamp "no condition trained: stopping"; exit 1; }
ORDER=("${TRAINED[@]}")
stamp "pre-training done"
pack

ppl() {  # model, out, length[, samples[, max context]]: perplexity by 128-token bucket on the
  # held-out packages; with a max context, the control (each token from at most that many)
  $PY -m longreach eval ppl --model "$1" --lengths "$3" --bucket 128 --samples "${4:-12}" \
      ${5:+--max-context "$5"} --haystack "$DATA/heldout.jsonl.gz" --out "$2" --quiet \
      > "$2.log" 2>&1
}
train_len() {  # a condition's training length: its data.seq_len override, else 256
  local n
  n=$(grep -o 'data\.seq_len=[0-9]*' <<< "${CONDITIONS[$1]}" | cut -d= -f2)
  echo "${n:-256}"
}
stamp "base models: perplexity to 16K, and the control with the context cut to the training length"
mkdir -p "$WORK/evals"
for c in "${ORDER[@]}"; do
  ppl "$WORK/pretrain/$c/final" "$WORK/evals/base-$c-ppl" 16k &
  ppl "$WORK/pretrain/$c/final" "$WORK/evals/base-$c-ppl-control" 16k 12 "$(train_len "$c")" &
done
wait
BASE=$($PY - "$WORK/evals" $(for c in "${ORDER[@]}"; do echo "$c=$(train_len "$c")"; done) \
    2>> "$LOG" <<'PY'
import json, math, sys
from pathlib import Path
evals = Path(sys.argv[1])
lengths = dict(arg.split("=") for arg in sys.argv[2:])  # condition: its training length
best, best_rise = next(iter(lengths)), 1.0
for name, train_len in lengths.items():
    train_len = int(train_len)
    try:
        s = json.loads((evals / f"base-{name}-ppl" / "summary.json").read_text())
        control = json.loads((evals / f"base-{name}-ppl-control" / "summary.json").read_text())
    except OSError:
        continue
    # past 8x the training length: the full-context loss against the control's on the same
    # tokens (context cut to the training length), so the content cancels
    def far(summary):
        return [b["nll"] for b in summary["cells"] if b["start"] >= 8 * train_len]
    full, cut = far(s), far(control)
    rise = math.exp((sum(full) - sum(cut)) / len(full)) if full and cut else 0.0
    print(f"{name}: past 8x, full-context ppl {rise:.3f}x the cut-context control's",
          file=sys.stderr)
    if rise > best_rise:
        best, best_rise = name, rise
print(best)
PY
)
BASE=${BASE:-${ORDER[0]}}  # the selection failed (its error is in the log): the first
stamp "base for post-training: $BASE"
pack
BASE_DIR=$WORK/pretrain/$BASE/final
echo "$BASE" > "$WORK/base.txt"
[ "${STOP_AFTER:-}" = base ] && { stamp "done (STOP_AFTER=base: pre-training and base evaluations)"; pack; exit 0; }

stamp "post-training ${#KINDS[@]} interventions side by side, $POST_STEPS steps each"
INIT_FROM=$BASE_DIR
for kind in "${KINDS[@]}"; do
  # shellcheck disable=SC2086
  train "$WORK/post/$kind" mamba2-small-posttrain ${CONDITIONS[$BASE]} "train.steps=$POST_STEPS" \
      "train.initial_state=$kind"
done
wait
INIT_FROM=
for kind in "${KINDS[@]}"; do
  [ -f "$WORK/post/$kind/final/config.json" ] || stamp "post-training $kind failed: $(tail -1 "$WORK/post/$kind/train.log")"
done
stamp "post-training done"
pack

TRAIN_LEN=$(train_len "$BASE")
LENGTHS=$($PY -c "t=$TRAIN_LEN; print(','.join(str(t * m) for m in (1, 4, 8, 16, 32)))")
stamp "evaluations of 6 models (ppl to 64x, passkey $LENGTHS, EffRem at 4x)"
evaluate() {  # name, model
  local out=$WORK/evals/$1
  mkdir -p "$out"
  ppl "$2" "$out/ppl" "$(( TRAIN_LEN * 64 ))" "$PPL_SAMPLES"
  ppl "$2" "$out/ppl-control" "$(( TRAIN_LEN * 64 ))" "$PPL_SAMPLES" "$TRAIN_LEN"
  $PY -m longreach eval passkey --model "$2" --lengths "$LENGTHS" --depths 0,0.5,1 --samples "$PASSKEY_SAMPLES" \
      --split heldout --haystack "$DATA/heldout.jsonl.gz" --out "$out/passkey" --quiet \
      > "$out/passkey.log" 2>&1
  $PY -m longreach eval passkey --model "$2" --lengths "$LENGTHS" --depths 0,0.5,1 --samples "$PASSKEY_SAMPLES" \
      --split train --haystack "$DATA/heldout.jsonl.gz" --out "$out/passkey-train" --quiet \
      > "$out/passkey-train.log" 2>&1
  $PY -m longreach eval effrem --model "$2" --T "$(( TRAIN_LEN * 4 ))" --samples "$EFFREM_SAMPLES" \
      --haystack "$DATA/heldout.jsonl.gz" --out "$out/effrem" --quiet > "$out/effrem.log" 2>&1
}
evaluate base "$BASE_DIR" &
for kind in "${KINDS[@]}"; do evaluate "$kind" "$WORK/post/$kind/final" & done
wait
$PY -m longreach report "$WORK/evals/base" "${KINDS[@]/#/$WORK/evals/}" --mark "$TRAIN_LEN" \
    --names "$(IFS=,; echo "base,${KINDS[*]}")" --out "$WORK/evals/report" >> "$LOG" 2>&1
stamp "evaluations done"
pack

[ "${BENCH:-1}" = 0 ] && { stamp "done (no bench)"; pack; exit 0; }
stamp "bench recurrence, alone on the GPU"
timeout 420 $PY -m longreach bench recurrence --suite op,model --lengths 2k --autotune first \
    --out "$WORK/bench_recurrence.json" > "$WORK/bench.log" 2>&1
stamp "bench: exit $?"
pack
if [ -d runs/old-code/longreach ]; then  # the code before this study's kernel changes
  (cd runs/old-code && timeout 300 $PY -m longreach bench recurrence --suite model --autotune first \
      --out "$WORK/bench_recurrence_before.json" > "$WORK/bench_before.log" 2>&1)
  stamp "bench of the earlier code: exit $?"
fi
stamp "done"
pack
