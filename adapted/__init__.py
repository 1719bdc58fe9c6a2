"""Stage 3: the adapted model (adapters spliced into the target) and what runs on it: refinement,
evaluation, interventions, attribution and exports to other tools' layouts."""
