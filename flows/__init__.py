"""Prefect flows: ``image-to-3d`` and, later, the GPU stage and catalog flows."""
