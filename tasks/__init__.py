"""Prefect tasks: thin wrappers (retries, logging, artifacts) around the library's pipeline steps."""
