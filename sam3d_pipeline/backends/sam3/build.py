"""What building either SAM 3 model (the image model in ``segmenter``, the video predictor in ``video``) needs: the
device choice and the random-weights seed and fixes. No torch import at module level."""

from __future__ import annotations

import logging

from sam3d_pipeline.errors import BackendUnavailableError

log = logging.getLogger(__name__)

# Text-encoder parameters created with ``torch.empty`` (``sam3/model/text_encoder_ve.py:196`` and ``:218``)
# that only a checkpoint fills; random init must set them or outputs are NaN.
RANDOM_INIT_SEED = 0
UNINITIALISED_PARAMS = (
    "backbone.language_backbone.encoder.positional_embedding",
    "backbone.language_backbone.encoder.text_projection",
)


def pick_device(requested: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu`` (with a loud warning)."""
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"sam3_device={requested!r} but torch sees no CUDA device")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    log.warning("SAM 3 is running on the CPU: expect about a minute per image and ~6 GiB of memory")
    return "cpu"
