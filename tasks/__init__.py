"""Prefect tasks: thin wrappers that add caching, retries, names and artifacts around `personatune`."""
