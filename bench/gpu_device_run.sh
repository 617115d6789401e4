#!/usr/bin/env bash
# One prepared pass on a lent GPU machine (under 10 minutes), most important first: QLoRA vs LoRA memory, padded vs
# padding-free vs a plain HF Trainer, MFU at real shapes (1.5B full, Llama-3-8B-shape LoRA), then the speed options.
# Each part has its own time limit and log under $OUT, so one failure leaves the others' numbers.
# Carried: .whl (pydantic, liger-kernel), .whl2 (transformers 5.24, peft 0.21.2, tokenizers) and .bnb (bitsandbytes
# 0.50.2 unpacked, CUDA 13.0 and CPU libraries only, to fit the carry limit). Usage: bash bench/gpu_device_run.sh
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl2/*.whl 2>&1 | tail -2
[ -d .bnb/bitsandbytes ] && cp -r .bnb/bitsandbytes /tmp/site/
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes; print('versions torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name(0))" 2>&1 | tail -1
python3 -c "import liger_kernel; print('liger-kernel importable')" 2>&1 | tail -1
part() {  # part NAME SECONDS COMMAND...: run with a limit, keep the log, show the result lines
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit=$? in $((SECONDS - start)) s"
  grep -E "^RESULT|^\||Error|error:|Traceback" "$OUT/$name.log" | grep -v "^| *$" | tail -14
}
part methods 90 python3 bench/gpu_methods.py --shape qwen2.5-1.5b --methods lora,qlora,qlora8 --steps 10 \
  --batch 8 --cutoff 1024 --samples 120 --out /tmp/methods
cp /tmp/methods/methods.json "$OUT/" 2>/dev/null
part sft 120 python3 bench/gpu_sft.py --shape qwen2.5-0.5b --methods lora --steps 15 --repeats 1 \
  --batching padded,padding_free --cutoff 2048 --samples 300 --out /tmp/bench
cp /tmp/bench/results.json "$OUT/sft.json" 2>/dev/null
part mfu 220 python3 bench/gpu_mfu.py --runs qwen2.5-1.5b:full,llama3-8b:lora --seq 4096 --batch 2 --steps 10 \
  --samples 500 --out /tmp/mfu
cp /tmp/mfu/mfu.json "$OUT/" 2>/dev/null
if [ -n "${SPEED_EXTRA:-}" ]; then  # the speed options (torch.compile, 8-bit optimizer, offload) on the 1.5B model
  part options 130 python3 bench/gpu_mfu.py --runs "$SPEED_EXTRA" --seq 4096 --batch 2 --steps 8 --samples 500 \
    --out /tmp/mfu
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
