#!/usr/bin/env bash
# Makes the folders that bench/gpu_device_run.sh carries to a lent GPU machine, whose image reaches no network:
#   .whl   pydantic (tunelab's config; not on the image), liger-kernel, torchao
#   .whl2  transformers and peft at the versions tunelab is developed against (the image has older ones)
#   .bnb   bitsandbytes, unpacked, with only its CUDA 13.0 and CPU libraries (the whole wheel is over the carry limit)
#   .whlf  LLaMA-Factory 0.9.5 with its own pins, for the `peers` part (installed apart, into /tmp/lf)
# Run once here, in the repository root, before a session's first device call; then carry the four folders:
#   bash bench/gpu_carry.sh && run(command=..., carry=[".whl", ".whl2", ".bnb", ".whlf"])
# Every wheel is for the image's Python (3.12, x86-64), fetched with --no-deps: the versions below are the ones
# GPU passes 4-6 ran with (bench/RESULTS.md), and what the image already holds is not fetched again.
# LLaMA-Factory's other requirements (gradio, fastapi, av, tyro, ...) are not on the image and not carried: its
# training path does not import them (passes 4 and 5 ran without them).
# A device call carries at most 64 MiB with the working tree; the script prints the total and fails above 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
TAGS=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
fetch() {  # fetch FOLDER NAME==VERSION ...
  local folder=$1; shift
  mkdir -p "$folder"
  # pip's own exit status counts (pipefail); only grep's "nothing left to print" is forgiven
  python3 -m pip download -q "${TAGS[@]}" -d "$folder" "$@" 2>&1 | { grep -v "is ignored" || true; }
}
rm -rf .whl .whl2 .bnb .whlf
fetch .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  liger-kernel==0.8.5 torchao==0.18.0
# tokenizers too, though the image's 0.23.2 would do: transformers checks the version at import
fetch .whl2 transformers==5.24.0 peft==0.21.2 tokenizers==0.23.2
fetch .whlf llamafactory==0.9.5 transformers==5.6.0 peft==0.18.1 trl==0.24.0 datasets==4.0.0 accelerate==1.11.0 \
  tokenizers==0.22.2 dill==0.3.8 multiprocess==0.70.16 omegaconf==2.4.0 opentelemetry-api==1.45.2
# bitsandbytes ships one library per CUDA version; the image's torch is built for CUDA 13.0.
bnb_wheel=$(mktemp -d)
fetch "$bnb_wheel" bitsandbytes==0.50.2
mkdir -p .bnb
python3 -m zipfile -e "$bnb_wheel"/bitsandbytes-0.50.2-*.whl .bnb/
rm -rf "$bnb_wheel" .bnb/*.dist-info
find .bnb/bitsandbytes -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130*.so' ! -name 'libbitsandbytes_cpu.so' \
  -delete
ls .bnb/bitsandbytes/libbitsandbytes_*.so
total=$(du -cm .whl .whl2 .bnb .whlf | tail -1 | cut -f1)
du -sh .whl .whl2 .bnb .whlf
echo "carry total: ${total} MiB (the limit is 64 MiB with the working tree)"
[ "$total" -le 60 ] || { echo "over 60 MiB: drop a part's wheels or split the calls" >&2; exit 1; }
