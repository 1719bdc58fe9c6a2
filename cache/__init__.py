"""Stage 1: models, the data plan, the harvester and the Zarr activation store."""
