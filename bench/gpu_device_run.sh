#!/usr/bin/env bash
# One prepared pass on a lent GPU machine (under 10 minutes), most important first: QLoRA vs LoRA memory, padded vs
# padding-free vs a plain HF Trainer, MFU at real shapes (1.5B full, Llama-3-8B-shape LoRA), then the speed options.
# Each part has its own time limit and log under $OUT, so one failure leaves the others' numbers.
# Carried: .whl (pydantic, liger-kernel, torchao), .whl2 (transformers 5.24, peft 0.21.2, tokenizers), .bnb (bitsandbytes
# 0.50.2 unpacked, CUDA 13.0 and CPU libraries only, to fit the carry limit) and, for the `peers` part, .whlf
# (LLaMA-Factory 0.9.5 with its pins: transformers 5.6.0, peft 0.18.1, trl 0.24.0, datasets 4.0.0, accelerate 1.11.0,
# tokenizers 0.22.2, dill, multiprocess, omegaconf, opentelemetry-api). `bash bench/gpu_carry.sh` makes all four here
# (a new machine has none of them). Usage: bash bench/gpu_device_run.sh
# PARTS picks the parts, e.g. PARTS="peers profile" PEERS_ROWS=tool:mode,... PROFILES="shape:method:k=v,k=v;..."
# (bench/RESULTS.md gives the exact commands of each GPU pass).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl2/*.whl 2>&1 | tail -2
[ -d .bnb/bitsandbytes ] && cp -r .bnb/bitsandbytes /tmp/site/
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes; print('versions torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name(0))" 2>&1 | tail -1
python3 -c "import liger_kernel; print('liger-kernel importable')" 2>&1 | tail -1
# LLaMA-Factory's GPU comparison needs pyarrow and pandas from the image (their wheels do not fit the carry limit)
python3 -c "import pyarrow, pandas; print('pyarrow', pyarrow.__version__, 'pandas', pandas.__version__)" 2>&1 | tail -1
part() {  # part NAME SECONDS COMMAND...: run with a limit, keep the log, show the result lines
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit=$? in $((SECONDS - start)) s"
  grep -E "^RESULT|^\||Error|error:|Traceback" "$OUT/$name.log" | grep -v "^| *$" | tail -14
}
has() { [[ " ${PARTS:-methods sft mfu} " == *" $1 "* ]]; }  # PARTS picks the parts; they run in this file's order
MFU="python3 bench/gpu_mfu.py --seq 4096 --batch 2 --steps ${MFU_STEPS:-10} --samples 500 --out /tmp/mfu"
if has methods; then
  part methods 90 python3 bench/gpu_methods.py --shape qwen2.5-1.5b --methods lora,qlora,qlora8 --steps 10 \
    --batch 8 --cutoff 1024 --samples 120 --out /tmp/methods
  cp /tmp/methods/methods.json "$OUT/" 2>/dev/null
fi
if has sft; then
  part sft 120 python3 bench/gpu_sft.py --shape qwen2.5-0.5b --methods lora --steps 15 --repeats 1 \
    --batching padded,padding_free --cutoff 2048 --samples 300 --out /tmp/bench
  cp /tmp/bench/results.json "$OUT/sft.json" 2>/dev/null
fi
if has mfu; then
  part mfu 220 $MFU --runs qwen2.5-1.5b:full,llama3-8b:lora
  cp /tmp/mfu/mfu.json "$OUT/mfu.json" 2>/dev/null
fi
if has liger; then  # its own process: liger-kernel patches the modeling modules for the whole process
  part liger 170 $MFU --runs "${LIGER_RUNS:-llama3-8b:lora+train.liger_kernel=true,llama3-8b:lora+train.liger_kernel=true+train.torch_compile=true,qwen2.5-3b:full+train.liger_kernel=true+train.torch_compile=true}"
  cp /tmp/mfu/mfu.json "$OUT/mfu-liger.json" 2>/dev/null
fi
if has full; then  # full fine-tuning of the 1.5B and 3B shapes
  part full "${FULL_LIMIT:-120}" $MFU --runs "${FULL_RUNS:-qwen2.5-1.5b:full,qwen2.5-3b:full+train.torch_compile=true}"
  cp /tmp/mfu/mfu.json "$OUT/mfu-full.json" 2>/dev/null
fi
if has peers; then  # tunelab vs LLaMA-Factory (its own pinned stack, carried as wheels in .whlf) on one GPU
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lf .whlf/*.whl 2>&1 | tail -2
  part peers "${PEERS_LIMIT:-420}" python3 bench/gpu_peers.py --lf-path /tmp/lf --shape "${PEERS_SHAPE:-llama3-8b}" \
    --out /tmp/peers --steps "${PEERS_STEPS:-20}" ${PEERS_ROWS:+--rows "$PEERS_ROWS"}
  cp /tmp/peers/peers.json /tmp/peers/peers.md "$OUT/" 2>/dev/null
  # later parts reuse its model (gpu_mfu.py and gpu_profile.py look in their --out for model-SHAPE)
  [ -f /tmp/peers/model/config.json ] && mkdir -p /tmp/mfu && ln -sfn /tmp/peers/model "/tmp/mfu/model-${PEERS_SHAPE:-llama3-8b}"
fi
if has lora8b; then  # Llama-3-8B shape, LoRA: eager, then torch.compile (one process: compile is undone after a run)
  part lora8b "${LORA8B_LIMIT:-170}" $MFU --runs "${LORA8B_RUNS:-llama3-8b:lora,llama3-8b:lora+train.torch_compile=true}"
  cp /tmp/mfu/mfu.json "$OUT/mfu-lora8b.json" 2>/dev/null
fi
if has profile; then  # where a step's time goes (2 recorded steps), for each shape:method:overrides in PROFILES
  IFS=';' read -ra profiles <<< "${PROFILES:-llama3-8b:lora:}"
  for i in "${!profiles[@]}"; do
    IFS=':' read -r shape method extra <<< "${profiles[$i]}"
    part "profile-$i" "${PROFILE_LIMIT:-90}" python3 bench/gpu_profile.py --shape "$shape" --method "$method" \
      --extra "$extra" --out /tmp/mfu
    grep -v "^RESULT" "$OUT/profile-$i.log" | grep -E "^-|^Name|^ |Self|median|per recorded" | head -28
  done
fi
if [ -n "${SPEED_EXTRA:-}" ]; then  # the speed options (torch.compile, 8-bit optimizer, offload) on the 1.5B model
  part options 130 $MFU --runs "$SPEED_EXTRA"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
