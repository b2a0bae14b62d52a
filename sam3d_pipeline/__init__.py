"""sam3d-pipeline: photos to 3D assets (SAM 3 segmentation, SAM 3D Objects reconstruction) on Prefect."""

__version__ = "0.1.0"
