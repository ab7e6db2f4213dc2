#!/usr/bin/env bash
# The CUDA checks, as one call on a lent GPU machine (the device tool's `run`; docs/benchmarks.md has the results):
#
#   bash benchmarks/gpu_session.sh      # with the wheels the image lacks in .whl/ (carried), results under $OUT
#
# 1. benchmarks/gpu_anchor.py: GRPO and GCPO at the anchor shape (Qwen2.5-0.5B-shaped, 8 x G = 8, 256 tokens, bf16);
# 2. the tests that skip without CUDA (tests/e2e/test_gpu.py);
# 3. benchmarks/gpu_check.py: bf16 steps, 4-bit reference, FSDP2, chunked log-probs, static cache with CUDA graphs.
# Each part gets what is left of the budget (BUDGET_S, default 540 s), so a slow part cannot take the others' time.
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}
start=$(date +%s)
until_s() { echo $(($1 - ($(date +%s) - start))); }  # seconds from now until $1 s after the start

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, transformers, lightning, bitsandbytes as b; print(sys.version.split()[0], 'torch',
        torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'lightning',
        lightning.__version__, 'bitsandbytes', b.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

# a token budget per forward/backward pass for both methods: the paper's gradient pass on x_i holds activations for
# rows x |x_i| (about 2,000 tokens here), which at the configs' 32 rows may not fit in one GPU (docs/scaling.md);
# GRPO's 270-token rows stay at 32 a pass
timeout "$(until_s $((BUDGET_S * 55 / 100)))" python3 benchmarks/gpu_anchor.py --steps 3 \
    --compare "${ANCHOR_VARIANTS:-default,default_batch512}" \
    "--extra=--model.micro_batch_tokens=${ANCHOR_MICRO_TOKENS:-16384}" 2>&1 | tee "$OUT/anchor.txt"
timeout "$(until_s $((BUDGET_S * 8 / 10)))" python3 -m pytest -v -rA -n 0 -p no:cacheprovider tests/e2e/test_gpu.py 2>&1 \
    | tee "$OUT/gpu_tests.txt"
timeout "$(until_s "$BUDGET_S")" python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
echo "session: $(($(date +%s) - start)) s" | tee -a "$OUT/machine.txt"
