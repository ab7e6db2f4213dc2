"""What a training run needs beyond the step: callbacks, checks, distributed helpers, metrics, RNG state."""
