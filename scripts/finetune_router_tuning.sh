#!/usr/bin/env bash
# Router-Tuning launcher with the seed's knobs (scripts/finetune_router_tuning.sh of
# CASE-Lab-UMD/Router-Tuning-Mixture-of-Depths), running `python -m routertune.train` under
# `accelerate launch`.
#
#   bash scripts/finetune_router_tuning.sh
#   NUM_PROCESSES=4 PORT=29501 bash scripts/finetune_router_tuning.sh
#   DATA_TYPE=alpaca MOD_N=8 GRADIENT_SCALE=0.05 bash scripts/finetune_router_tuning.sh --bf16
#
# Every knob below can be edited here or overridden from the environment; arguments after the
# script name are passed on to routertune.train (e.g. --bf16, --gradient_checkpointing,
# --loss lm+distill, --use_lora). Launch config: ACCELERATE_CONFIG (a file), else ENGINE:
#   ENGINE=zero1 | zero2 | zero3 | fsdp2 | ddp   configs/accelerate/deepspeed_zero{1,2,3}.yaml,
#                                                fsdp2.yaml (GPUs only: accelerate enables FSDP on
#                                                GPUs), or plain DDP (multi_gpu / cpu_2proc.yaml)
# default: ZeRO-1 on GPUs (the seed's setup; DDP when deepspeed is not installed), two CPU processes
# over gloo when NUM_PROCESSES > 1 without a GPU, else a single plain process. ZeRO-3 and FSDP2
# shard the frozen weights too (models that do not fit one device); docs/training.md compares them.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_PATH="$(cd "${SCRIPT_DIR}/.." && pwd)"
cd "${ROOT_PATH}"
PYTHON="${PYTHON:-python3}"

# ---- model: a built-in name, a hub id, or (the seed's folder_name) a folder under ckpt/ --------
FOLDER_NAME="${FOLDER_NAME:-}"
if [[ -n "${FOLDER_NAME}" ]]; then
  MODEL_NAME_OR_PATH="${ROOT_PATH}/ckpt/${FOLDER_NAME}"
else
  MODEL_NAME_OR_PATH="${MODEL_NAME_OR_PATH:-smollm2-135m-instruct}"
fi
RUN_NAME="${RUN_NAME:-$(basename "${MODEL_NAME_OR_PATH}")}"

# ---- data: builtin (offline mix), mixed (data/mixed/data.jsonl) or a dataset under data/reformatted/
DATA_TYPE="${DATA_TYPE:-builtin}"
MAX_TRAIN_SAMPLES="${MAX_TRAIN_SAMPLES:-1000}"
MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-2048}"

# ---- routers ------------------------------------------------------------------------------------
MOD_N="${MOD_N:-16}"                          # router_layers (alias mindskip_n)
GRANULARITY="${GRANULARITY:-attn_sequence}"   # attn_token / mlp_sequence / mlp_token / block_sequence / block_token
ROUTER_ONLY="${ROUTER_ONLY:-True}"
TARGET_CAPACITY="${TARGET_CAPACITY:-0}"       # with GRADIENT_SCALE: skip units worth less than that many nats/token
GRADIENT_SCALE="${GRADIENT_SCALE:-0.02}"      # 0 = the seed's default (no regulariser): routers then skip less
LOSS="${LOSS:-lm}"                            # lm | distill | lm+distill

# ---- optimisation ---------------------------------------------------------------------------------
# Empty LEARNING_RATE / OPTIM = routertune's defaults for what is trained: SGD 0.1 for routers
# only, AdamW 2e-4 with --use_lora, AdamW 2e-5 for full fine-tuning (the seed: AdamW 1e-5 on 8B
# models, which barely moves routers; docs/training.md has the measurements).
LEARNING_RATE="${LEARNING_RATE:-}"
OPTIM="${OPTIM:-}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.}"
NUM_EPOCHS="${NUM_EPOCHS:-1}"
TOTAL_BATCH_SIZE="${TOTAL_BATCH_SIZE:-8}"    # the seed: 64; 8 gives 125 router updates on 1000 examples

# ---- processes ----------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  DETECTED_GPUS="$(nvidia-smi -L | wc -l | tr -d ' ')"
else
  DETECTED_GPUS=0
fi
NUM_PROCESSES="${NUM_PROCESSES:-$(( DETECTED_GPUS > 0 ? DETECTED_GPUS : 1 ))}"
PORT="${PORT:-29501}"
PER_PROCESS=$(( TOTAL_BATCH_SIZE / NUM_PROCESSES ))
BATCH_SIZE_PER_DEVICE="${BATCH_SIZE_PER_DEVICE:-$(( PER_PROCESS > 0 ? PER_PROCESS : 1 ))}"
GRADIENT_ACC_STEPS=$(( TOTAL_BATCH_SIZE / NUM_PROCESSES / BATCH_SIZE_PER_DEVICE ))
if [[ "${GRADIENT_ACC_STEPS}" -lt 1 ]]; then
  echo "WARN: TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE} < NUM_PROCESSES x BATCH_SIZE_PER_DEVICE; using 1 accumulation step" >&2
  GRADIENT_ACC_STEPS=1
fi

OUTPUT_DIR="${OUTPUT_DIR:-${ROOT_PATH}/trained_models/${RUN_NAME}/${DATA_TYPE}/${MAX_TRAIN_SAMPLES}/${GRANULARITY}_epoch${NUM_EPOCHS}_router_layers${MOD_N}_lambda${GRADIENT_SCALE}_target${TARGET_CAPACITY}_lr${LEARNING_RATE:-default}_wd${WEIGHT_DECAY}_${LOSS}}"

TRAIN_ARGS=(
  --model_name_or_path "${MODEL_NAME_OR_PATH}"
  --data_type "${DATA_TYPE}"
  --max_train_samples "${MAX_TRAIN_SAMPLES}"
  --max_seq_length "${MAX_SEQ_LENGTH}"
  --granularity "${GRANULARITY}"
  --router_layers "${MOD_N}"
  --router_only "${ROUTER_ONLY}"
  --target_capacity "${TARGET_CAPACITY}"
  --gradient_scale "${GRADIENT_SCALE}"
  --loss "${LOSS}"
  --per_device_train_batch_size "${BATCH_SIZE_PER_DEVICE}"
  --gradient_accumulation_steps "${GRADIENT_ACC_STEPS}"
  --lr_scheduler_type cosine
  --warmup_ratio 0.03
  --weight_decay "${WEIGHT_DECAY}"
  --num_train_epochs "${NUM_EPOCHS}"
  --logging_steps 10
  --save_steps 100
  --save_total_limit 1
  --output_dir "${OUTPUT_DIR}"
)

if [[ -n "${LEARNING_RATE}" ]]; then TRAIN_ARGS+=(--learning_rate "${LEARNING_RATE}"); fi
if [[ -n "${OPTIM}" ]]; then TRAIN_ARGS+=(--optim "${OPTIM}"); fi

echo "MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH}" >&2
echo "OUTPUT_DIR=${OUTPUT_DIR}" >&2
echo "NUM_PROCESSES=${NUM_PROCESSES} GRADIENT_ACC_STEPS=${GRADIENT_ACC_STEPS}" >&2

ENGINE="${ENGINE:-}"
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  CONFIG_FILE="${ACCELERATE_CONFIG}"
elif [[ -n "${ENGINE}" ]]; then
  case "${ENGINE}" in
    zero1|zero2|zero3) CONFIG_FILE="${ROOT_PATH}/configs/accelerate/deepspeed_${ENGINE}.yaml" ;;
    fsdp2) CONFIG_FILE="${ROOT_PATH}/configs/accelerate/fsdp2.yaml" ;;
    ddp) if [[ "${DETECTED_GPUS}" -gt 0 ]]; then
           CONFIG_FILE="${ROOT_PATH}/configs/accelerate/multi_gpu.yaml"
         else
           CONFIG_FILE="${ROOT_PATH}/configs/accelerate/cpu_2proc.yaml"
           TRAIN_ARGS+=(--use_cpu)
         fi ;;
    *) echo "ERROR: ENGINE=${ENGINE}: use zero1, zero2, zero3, fsdp2 or ddp" >&2; exit 2 ;;
  esac
  if [[ "${ENGINE}" == zero* && "${DETECTED_GPUS}" -eq 0 ]]; then
    TRAIN_ARGS+=(--ddp_backend gloo)  # DeepSpeed on CPU processes
  fi
  if [[ "${ENGINE}" == fsdp2 && "${DETECTED_GPUS}" -eq 0 ]]; then
    echo "ERROR: ENGINE=fsdp2 needs GPUs (accelerate enables FSDP only on GPU device types); use ENGINE=zero3 on CPU" >&2
    exit 2
  fi
elif [[ "${DETECTED_GPUS}" -gt 0 ]]; then
  if "${PYTHON}" -c "import deepspeed" >/dev/null 2>&1; then
    CONFIG_FILE="${ROOT_PATH}/configs/accelerate/deepspeed_zero1.yaml"
  else
    CONFIG_FILE="${ROOT_PATH}/configs/accelerate/multi_gpu.yaml"
  fi
elif [[ "${NUM_PROCESSES}" -gt 1 ]]; then
  CONFIG_FILE="${ROOT_PATH}/configs/accelerate/cpu_2proc.yaml"
  TRAIN_ARGS+=(--use_cpu)
else
  exec "${PYTHON}" -m routertune.train "${TRAIN_ARGS[@]}" --use_cpu "$@"
fi
echo "CONFIG_FILE=${CONFIG_FILE}" >&2

exec "${PYTHON}" -m accelerate.commands.launch \
  --config_file "${CONFIG_FILE}" \
  --num_processes "${NUM_PROCESSES}" \
  --num_machines 1 \
  --main_process_port "${PORT}" \
  -m routertune.train "${TRAIN_ARGS[@]}" "$@"
