"""The LLM2Loss method and its data, as plain Python (torch, polars, duckdb).

Nothing in this package imports Dagster: every piece can be used and tested alone.
"""
