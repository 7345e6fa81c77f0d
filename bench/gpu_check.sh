#!/usr/bin/env bash
# GPU path check (run on a CUDA machine; ≤ 10 min on one H100/H200): bf16 step costs for B/2 and XL/2
# on ImageNet-256 latent shapes (4×32×32), CUDA JVP through attention (MATH SDPA inside the JVP), and
# sampling throughput. Results land in bench/results/*-cuda*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
$PY -m pytest -q tests/test_models.py -k "jvp or bf16"           # JVP = finite differences (CPU reference)
$PY bench/step_cost.py --device cuda --bf16 --preset B/2 --image-size 32 --batch 64 --repeats 10
$PY bench/step_cost.py --device cuda --bf16 --preset XL/2 --image-size 32 --batch 32 --repeats 5 \
    --variants fm cm cm_dual decm decm_dual
$PY bench/sampling.py --device cuda --preset XL/2 --image-size 32 --batch 256 --repeats 5
