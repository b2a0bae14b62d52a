"""Prefect tasks: thin wrappers (retries, logging, artifacts) around the library's steps, and the GPU stage tasks
with their one dispatch point (``gpu_dispatch``)."""
