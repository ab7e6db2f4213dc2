"""``python -m gcpo_lightning.reporting RUN_DIR ...``: the ``report`` command without importing Lightning."""

from gcpo_lightning.reporting.command import main

if __name__ == "__main__":
    raise SystemExit(main())
