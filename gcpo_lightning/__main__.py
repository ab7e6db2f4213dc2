"""``python -m gcpo_lightning``: see :mod:`gcpo_lightning.cli`."""

from gcpo_lightning.cli import main

if __name__ == "__main__":
    main()
