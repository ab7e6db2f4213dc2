"""What a run was configured with: the component classes in the ``config.yaml`` LightningCLI saved beside it.

Optional: a run without a readable ``config.yaml`` (a plain ``Trainer`` run, a copied ``metrics.csv``) is
reported without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
SLOTS = ("graph_builder", "adjuster", "kl", "loss")
"""The slots that tell GRPO from GCPO and the loss variants apart."""


def components(metrics: Path) -> dict[str, str]:
    """Slot to class name (``{"adjuster": "CausalAdvantage", ...}``) from the ``config.yaml`` next to ``metrics``."""
    try:
        config = yaml.safe_load((metrics.parent / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return {}
    return {slot: name for slot in SLOTS if (name := class_name(model.get(slot)))}


def class_name(spec: Any) -> str | None:
    """The short class name of a ``class_path`` mapping or a bare class name string, else ``None``."""
    if isinstance(spec, dict):
        spec = spec.get("class_path")
    return spec.rsplit(".", 1)[-1] if isinstance(spec, str) and spec else None
