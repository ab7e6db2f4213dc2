"""``python -m gcpo_lightning report RUN_DIR ...``: plots and a markdown summary from the runs' ``metrics.csv``.

One concept per module, each usable alone, none importing torch, Lightning or the rest of the package (a
contract in ``pyproject.toml``), so a report can be made anywhere the CSV files can be copied:

- ``discovery``: which ``metrics.csv`` files a RUN_DIR holds, and the label of each run;
- ``csvfile``: a Lightning ``CSVLogger`` file read into checked rows (one clear error per bad file);
- ``clock``: training time reconstructed from the per-step ``timing/*`` metrics;
- ``runs``: the rows turned into one typed :class:`~gcpo_lightning.reporting.runs.Series` per metric;
- ``settings``: the component classes a run was configured with, from its ``config.yaml`` (optional);
- ``summary``: the numbers of a run (final and best held-out accuracy, final reward, step time and its phases);
- ``plots``: the PNG figures, one line per run, against steps and against training time;
- ``markdown``: ``report.md``;
- ``command``: the command line.
"""
