"""``python -m gcpo_lightning``: see :mod:`gcpo_lightning.cli` (``report`` starts without importing Lightning)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        from gcpo_lightning.reporting.command import main as report

        raise SystemExit(report(sys.argv[2:]))
    from gcpo_lightning.cli import main

    main()
