#!/usr/bin/env bash
# One prepared pass on a lent GPU machine: carried wheels, versions, the training tests on CUDA, the SFT bench,
# and the flash-attention error path. Writes logs under $OUT. Usage (from the repo root): bash bench/gpu_device_run.sh
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl2/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, peft, accelerate; print('versions', torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name(0))"
echo "== tests on CUDA"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/integration/test_train.py tests/unit/test_template_tokenize.py 2>&1 | tail -15
echo "== flash_attention_2 without flash-attn"
printf 'model: {name_or_path: x, attn_implementation: flash_attention_2}\ndata: {datasets: [{path: y.jsonl}]}\ntrain: {output_dir: /tmp/fa-out}\n' > /tmp/fa.yaml
python3 -m tunelab.cli train /tmp/fa.yaml; echo "exit=$?"
echo "== bench"
timeout 360 python3 bench/gpu_sft.py --shape qwen2.5-0.5b --steps 30 --batch 8 --cutoff 2048 --out /tmp/bench 2>&1 | grep -E "RESULTS|Error|error|Traceback" | tail -20
cp /tmp/bench/results.json "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
