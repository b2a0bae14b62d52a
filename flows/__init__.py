"""Prefect flows: ``image-to-3d``, ``catalog-batch`` and the ``gpu-worker`` session. Each file holds flows only;
what a flow decides lives in the library (``sam3d_pipeline``)."""
