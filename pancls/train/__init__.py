"""The one training core (``engine.fit``) and its parts: optimiser and schedule, samplers, loaders, checkpoints."""
