"""The local stack (`sam3d-pipeline up`): its processes, PostgreSQL, restarts, the unresponsive-run automation."""
