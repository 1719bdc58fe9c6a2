"""Stage 4: the DuckDB index of every feature activation and the SQL entry points."""
