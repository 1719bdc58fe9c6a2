"""Stage 2: transcoder adapters, the store loader, training, splicing and interventions."""
