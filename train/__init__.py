"""Stage 2: offline training: transcoder adapters, the loader over the store, the trainer, checkpoints."""
