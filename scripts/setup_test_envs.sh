#!/usr/bin/env bash
# Set up both environments the test suite needs, side by side:  bash scripts/setup_test_envs.sh
#
# `.venv` with the dev extras (scripts/setup.sh dev) and vLLM's own `.venv-vllm` (scripts/setup_vllm.sh) are
# independent, and each install is mostly one process unpacking wheels, so on two cores running them at once takes
# about the time of the longer one (docs/benchmarks.md, "Test and CI time"). vLLM's log goes to .venv-vllm-setup.log and is
# printed if it fails; the exit status is non-zero if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
log=.venv-vllm-setup.log
bash scripts/setup_vllm.sh >"$log" 2>&1 &
vllm_pid=$!
main_status=0
bash scripts/setup.sh dev || main_status=$?
vllm_status=0
wait "$vllm_pid" || vllm_status=$?
if [ "$vllm_status" -ne 0 ]; then
  echo "scripts/setup_vllm.sh failed (exit $vllm_status); its log, $log:" >&2
  tail -n 40 "$log" >&2
else
  tail -n 1 "$log"
fi
[ "$main_status" -eq 0 ] && [ "$vllm_status" -eq 0 ]
