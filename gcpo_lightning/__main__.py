"""``python -m gcpo_lightning``: see :mod:`gcpo_lightning.cli`.

``report`` starts without importing Lightning; ``context-use`` measures whether a model reads its GCPO context
(:mod:`gcpo_lightning.evaluation.context_use`).
"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        from gcpo_lightning.reporting.command import main as report

        raise SystemExit(report(sys.argv[2:]))
    if sys.argv[1:2] == ["context-use"]:
        from gcpo_lightning.evaluation.context_use_command import main as context_use

        raise SystemExit(context_use(sys.argv[2:]))
    from gcpo_lightning.cli import main

    main()
