#!/usr/bin/env bash
# GPU check (issue 14), a few minutes on a fresh CUDA machine with this repository checked out:
#   bash scripts/gpu_check.sh                     # make setup if needed, then the two checks below
#   bash scripts/gpu_check.sh --print-overrides   # the run's config overrides, one a line (a test composes them)
#
# 1. A production-like SpeechLLM run on one GPU: bf16, the largest bundled models (whisper-base encoder,
#    SmolLM2-135M-Instruct with LoRA), duration batching, a short CTC warm-up, STEPS steps; then the test-set
#    evaluation and `magnet-asr eval` of its final/. Prints steps/s, peak GPU memory and WER.
# 2. The same model under FSDP (configs/accelerate/fsdp.yaml) on every GPU: 10 steps with sharded checkpoints,
#    then a resume to 15 steps; final/ gathered on rank 0, loaded back and evaluated. The Trainer's FSDP path
#    cannot run on CPUs (accelerate sets up no FSDP there), so this is where it is tried.
# The WER after a few dozen steps is a smoke figure, not a result. Data: the offline corpora this machine can
# build (synth needs espeak-ng and flite, asterisk its Debian packages; `make setup` installs them where it can).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-40}
OUT=${OUT:-runs/gpu_check}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

# what both checks train: the production recipe's shape at the size of the bundled models
overrides() {
  local train=$1 held_out=$2
  printf '%s\n' \
    "+experiments=speech_llm_demo" "encoder=whisper_base" "training=gpu" "run_name=gpu_check" \
    "training.max_steps=$STEPS" "training.per_device_batch_size=16" "training.max_batch_seconds=120" \
    "training.warmup_steps=5" "training.eval_steps=0" "training.save_steps=$STEPS" "training.logging_steps=10" \
    "training.report_to=[]" "projector.ctc_warmup_steps=200" "llm.finetune=lora" "training.learning_rate=3e-4" \
    "data.train=[$train]" "data.validation=[$held_out]" "data.test=[$held_out]" "data.max_eval_utterances=100"
}

if [ "${1:-}" = "--print-overrides" ]; then
  overrides synth,asterisk asterisk
  exit 0
fi

start=$(date +%s)
[ -x "$PY" ] || make setup VENV="$VENV"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (a CPU wheel? reinstall torch for CUDA)")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

mkdir -p "$OUT"
corpora=()
for corpus in asterisk synth; do
  extra=()
  [ "$corpus" = synth ] && extra=(--num-utterances 400)
  if "$PY" -m magnet_asr data "$corpus" "${extra[@]}" >"$OUT/data-$corpus.log" 2>&1; then
    corpora+=("$corpus")
  else
    echo "gpu_check: no $corpus corpus here: $(tail -n 1 "$OUT/data-$corpus.log")"
  fi
done
if [ ${#corpora[@]} -eq 0 ]; then
  echo "gpu_check: no offline corpus could be built (needs espeak-ng + flite, or asterisk-core-sounds-en*)"
  exit 1
fi
train=$(IFS=,; echo "${corpora[*]}")
held_out=${corpora[0]}  # asterisk (real speech) where there is one
echo "gpu_check: training on [$train], evaluating on $held_out"
mapfile -t common < <(overrides "$train" "$held_out")

run() {  # run LOG SECONDS COMMAND...: the command's output into LOG; on failure its tail, and stop
  local log=$1 seconds=$2
  shift 2
  if ! timeout "$seconds" "$@" >"$log" 2>&1; then
    tail -n 30 "$log"
    echo "gpu_check: failed (log: $log)"
    exit 1
  fi
}

summary() {  # results.json -> one line: steps/s, peak memory, test WER
  "$PY" - "$1" <<'EOF'
import json
import sys

results = json.load(open(sys.argv[1]))
figures = results["train_figures"]
wers = {spec: round(test["wer"], 4) for spec, test in results["test"].items()}
print(
    f"gpu_check: {sys.argv[1]}: {figures['train_steps_per_second']} steps/s,"
    f" peak GPU memory {figures['peak_memory_gb']:.2f} GiB (rank 0), test WER {wers}"
)
EOF
}

echo "== 1. one GPU, bf16: $STEPS steps"
rm -rf "$OUT/bf16"
run "$OUT/bf16.log" 330 "$VENV/bin/accelerate" launch --config_file configs/accelerate/a40.yaml \
  -m magnet_asr train "${common[@]}" "training.output_dir=$OUT/bf16"
summary "$OUT/bf16/results.json"
run "$OUT/bf16-eval.log" 90 "$PY" -m magnet_asr eval --model "$OUT/bf16/final" --data "$held_out" \
  --limit 100 --out "$OUT/bf16/eval.json"
"$PY" - "$OUT/bf16/eval.json" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
print(f"gpu_check: magnet-asr eval of final/: WER {result['wer']:.4f} on {result['num_utterances']} utterances")
EOF

echo "== 2. FSDP on $GPUS GPU(s): 10 steps, sharded checkpoints, resume to 15"
rm -rf "$OUT/fsdp"
fsdp=("$VENV/bin/accelerate" launch --config_file configs/accelerate/fsdp.yaml --num_processes "$GPUS"
  -m magnet_asr train "${common[@]}" "training.output_dir=$OUT/fsdp" "projector.ctc_warmup_steps=0"
  "training.save_steps=5")
run "$OUT/fsdp.log" 150 "${fsdp[@]}" "training.max_steps=10"
grep -h "FSDP. wraps\|encoder cache is off" "$OUT/fsdp.log" | sort -u
run "$OUT/fsdp-resume.log" 120 "${fsdp[@]}" "training.max_steps=15" "training.resume_from_checkpoint=auto"
ls -d "$OUT"/fsdp/checkpoint-* "$OUT/fsdp/final/model.safetensors"
summary "$OUT/fsdp/results.json"
echo "gpu_check: done in $(($(date +%s) - start)) s"
