"""The GPU stages as plain functions, the warm workers' leases and failure classes, checkpoints."""
