#!/usr/bin/env bash
# GPU check: the real-size DE-CM step on CUDA, ready to run on a fresh GPU machine after the README's install.
#
#   bench/gpu_check.sh            # PY=path/to/python to use another interpreter than .venv/bin/python
#                                 # GPU_CHECK_MINUTES=M: stop each part after M minutes (default 7; what did not
#                                 # finish is recorded as stopped / not started in the JSON)
#
# One GPU (≈ 4 min on an H200, measured): LightningDiT-XL/1 and SiT-XL/2 (random weights, batch 32 per GPU)
# run 4 DE-CM training steps in bf16 autocast and in fp32 (bench/xl_cpu.py --device cuda), recording
# img/s, the peak allocated memory of each step against decm/memory.py's prediction, the cost of the
# passes a step is made of (no-grad forward F, JVP J, with-grad pass W, CFG teacher call, an FM step and
# an L_cm step: J in forward equivalents J/F, the L_cm/FM step-cost ratio), the attention kernel each pass
# ran (flash / memory-efficient / cuDNN / math, or decm's matmul + softmax JVP rule), and in fp32 the JVP
# tangent against a float64 central difference. With ≥ 2 GPUs also the same step under DDP and under FSDP
# (teacher sharded) over NCCL on every visible GPU. Writes bench/results/gpu-xl-<n>gpu-<device>.json and
# prints one table of everything it wrote. Exits 1 when a configuration fails or is stopped at the deadline
# (the JSON says which); a configuration refused because it does not fit the GPU, or not started because
# the deadline had passed, is recorded in the JSON with that status and does not change the exit status.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MINUTES=${GPU_CHECK_MINUTES:-7}
if ! NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"); then
    echo "bench/gpu_check.sh: cannot import torch with $PY (install as the README says, or set PY)" >&2
    exit 2
fi
if [ "$NGPU" -lt 1 ]; then
    echo "bench/gpu_check.sh: no CUDA device visible to $PY" >&2
    exit 2
fi
NAME=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")
mkdir -p bench/results
OUTS=("bench/results/gpu-xl-1gpu-$NAME.json")
STATUS=0
rm -f "${OUTS[0]}"  # a run that dies early must not print an older file's numbers
"$PY" bench/xl_cpu.py --device cuda --models lightningdit-xl1 sit-xl2 --configs single:bf16 single:fp32 \
    --batch 32 --steps 4 --passes --deadline-minutes "$MINUTES" --out "${OUTS[0]}" || STATUS=1
if [ "$NGPU" -ge 2 ]; then
    OUTS+=("bench/results/gpu-xl-${NGPU}gpu-$NAME.json")
    rm -f "${OUTS[1]}"
    "$PY" bench/xl_cpu.py --device cuda --models lightningdit-xl1 --configs "ddp$NGPU:bf16" "fsdp$NGPU:bf16" \
        --batch 32 --steps 4 --deadline-minutes "$MINUTES" --out "${OUTS[1]}" || STATUS=1
fi
WROTE=()
for f in "${OUTS[@]}"; do if [ -f "$f" ]; then WROTE+=("$f"); fi; done
echo
if [ "${#WROTE[@]}" -gt 0 ]; then "$PY" bench/xl_cpu.py --table "${WROTE[@]}"; else echo "bench/gpu_check.sh: no result file was written" >&2; fi
exit $STATUS
