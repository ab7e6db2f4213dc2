"""The vLLM tier (``tests/vllm_engine``) run from the main suite, in vLLM's own environment ``.venv-vllm``.

vLLM pins a transformers older than ``.venv``'s, so its tests run under ``.venv-vllm/bin/python`` (built by
``bash scripts/setup_vllm.sh``, which the README's test command and CI run first). Without that environment this
test is skipped with the command that builds it; under CI (``CI`` set) it fails instead, so that a CI without the
tier cannot pass unnoticed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SETUP = "bash scripts/setup_vllm.sh"


@pytest.mark.slow(seconds=330)  # engines built in-process and in 6 fits of their own (2 of them on 2 ranks)
def test_the_vllm_tier_passes_in_its_environment() -> None:
    if not VLLM_PYTHON.exists():
        message = f"no {VLLM_PYTHON.relative_to(REPO)}: `{SETUP}` builds vLLM's environment for tests/vllm_engine"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV"))}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # -n 0: the tier in one process, beside the main run's other worker (its engines share vLLM's per-process state)
    command = [str(VLLM_PYTHON), "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/vllm_engine"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    output = f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"tests/vllm_engine failed in .venv-vllm:\n{output}"
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]  # the tier was collected and ran
