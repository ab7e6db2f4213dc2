"""The paper's maths as pure tensor functions; this package imports nothing of gcpo_lightning.

``docs/algorithm.md`` maps each equation to its function."""
