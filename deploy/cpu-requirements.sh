#!/bin/sh
# The locked requirements (uv.lock) without torch, torchvision and the CUDA wheels they pull in
# (nvidia-*, triton): what the CPU image installs from PyPI before torch and torchvision come
# from PyTorch's CPU wheel index. Prints torch's and torchvision's locked versions on stderr.
#   deploy/cpu-requirements.sh > requirements-cpu.txt
set -eu
locked=$(uv export --frozen --no-dev --no-hashes --no-emit-project --no-header --no-annotate)
printf '%s\n' "$locked" | grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=='
printf '%s\n' "$locked" | sed -n -E 's/^(torch|torchvision)==([^ ;]+).*/\1==\2/p' >&2
