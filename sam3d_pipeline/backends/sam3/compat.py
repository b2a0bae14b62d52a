"""Compatibility layer that lets Meta's ``sam3==0.1.4`` image model run where CUDA or triton is missing.

The package hard-codes CUDA in a few places that the image model (with instance interactivity) reaches.
Each workaround below names the upstream file and line it covers and applies itself only when it is
needed: with a CUDA device and triton installed, :func:`apply` changes nothing.

Upstream references are to facebookresearch/sam3 as released on PyPI as ``sam3==0.1.4``.
Import this module only after torch is known to be installed (it imports torch).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import torch

log = logging.getLogger(__name__)

_APPLIED: list[str] = []


def cuda_ready() -> bool:
    """True when torch sees a CUDA device."""
    return bool(torch.cuda.is_available())


def triton_ready() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _stub_edt_module() -> str | None:
    """``sam3/model/edt.py:6`` does ``import triton`` at module level; ``sam3/model/sam3_tracker_utils.py:8``
    imports it, and the image model's interactive predictor imports the tracker. The Euclidean distance
    transform it provides is used by video tracking only, so without triton a stand-in module that raises
    on use is enough for image segmentation."""
    if triton_ready() or "sam3.model.edt" in sys.modules:
        return None
    stub = types.ModuleType("sam3.model.edt")

    def edt_triton(*_args, **_kwargs):
        raise RuntimeError("sam3's edt_triton needs triton (video tracking); install triton on a CUDA machine")

    stub.edt_triton = edt_triton  # type: ignore[attr-defined]
    sys.modules["sam3.model.edt"] = stub
    return "sam3/model/edt.py:6 (import triton) replaced by a stub raising on use"


def _cpu_position_encoding() -> str | None:
    """``sam3/model/position_encoding.py:47`` precomputes sine encodings on ``device="cuda"`` in
    ``PositionEmbeddingSine.__init__``. Without CUDA, build them without precomputation, then fill the
    same cache on the CPU."""
    if cuda_ready():
        return None
    from sam3.model import position_encoding

    cls = position_encoding.PositionEmbeddingSine
    if getattr(cls.__init__, "_sam3d_compat", False):
        return "position_encoding.py:47 already patched"
    original_init = cls.__init__

    def __init__(self, *args, precompute_resolution=None, **kwargs):
        original_init(self, *args, precompute_resolution=None, **kwargs)
        if precompute_resolution is not None:
            for divisor in (4, 8, 16, 32):
                size = (precompute_resolution // divisor, precompute_resolution // divisor)
                self.forward(torch.zeros((1, 1) + size))
                self.cache[size] = self.cache[size].clone().detach()

    __init__._sam3d_compat = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return "sam3/model/position_encoding.py:47 (precompute on cuda) now precomputes on the CPU"


def _cpu_decoder_coords() -> str | None:
    """``sam3/model/decoder.py:281`` calls ``self._get_coords(feat_size, feat_size, device="cuda")`` in
    ``TransformerDecoder.__init__``. Without CUDA, map that device to the CPU."""
    if cuda_ready():
        return None
    from sam3.model import decoder

    cls = decoder.TransformerDecoder
    original = cls._get_coords
    if getattr(original, "_sam3d_compat", False):
        return "decoder.py:281 already patched"

    def _get_coords(H, W, device):  # noqa: N803 (upstream's names)
        if str(device).startswith("cuda"):
            device = "cpu"
        return original(H, W, device)

    _get_coords._sam3d_compat = True  # type: ignore[attr-defined]
    cls._get_coords = staticmethod(_get_coords)
    return "sam3/model/decoder.py:281 (coords on cuda) now built on the CPU"


def _no_pin_memory() -> str | None:
    """``sam3/model/geometry_encoders.py:659`` (box prompts) and ``sam3/model/sam3_tracker_base.py:168``
    call ``Tensor.pin_memory()``, which needs a CUDA driver. Without CUDA, pinning is meaningless, so
    ``pin_memory`` returns the tensor itself (process-wide; only ever applied on CUDA-less machines)."""
    if cuda_ready():
        return None
    if getattr(torch.Tensor.pin_memory, "_sam3d_compat", False):
        return "pin_memory already patched"

    def pin_memory(self, *_args, **_kwargs):
        return self

    pin_memory._sam3d_compat = True  # type: ignore[attr-defined]
    torch.Tensor.pin_memory = pin_memory  # type: ignore[method-assign]
    return "Tensor.pin_memory (geometry_encoders.py:659, sam3_tracker_base.py:168) is a no-op without CUDA"


def _tensor_cuda_is_identity() -> str | None:
    """The video path moves tensors with ``Tensor.cuda()`` unconditionally: ``sam3/model/io_utils.py:66``, ``:107``
    and ``:204`` (frames), ``sam3/model/sam3_tracker_base.py:657`` and ``:664`` (memory features),
    ``sam3/model/sam3_tracking_predictor.py:303`` and ``:1026``. Without CUDA, ``Tensor.cuda`` returns the tensor
    itself (process-wide, like ``pin_memory``; only ever applied on CUDA-less machines)."""
    if cuda_ready():
        return None
    if getattr(torch.Tensor.cuda, "_sam3d_compat", False):
        return "Tensor.cuda already patched"

    def cuda(self, *_args, **_kwargs):
        return self

    cuda._sam3d_compat = True  # type: ignore[attr-defined]
    torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    return "Tensor.cuda (io_utils.py:66, sam3_tracker_base.py:657, ...) is a no-op without CUDA"


def _empty_batch_components() -> str | None:
    """``sam3/perflib/connected_components.py:48`` (the CPU fallback) stacks an empty list when a frame has no new
    detection (``fill_holes_in_mask_scores`` on zero masks); the GPU kernels return empty tensors. Without CUDA,
    an empty batch returns empty labels and counts of the input's shape."""
    if cuda_ready():
        return None
    from sam3.perflib import connected_components as cc

    original = cc.connected_components_cpu
    if getattr(original, "_sam3d_compat", False):
        return "connected_components_cpu already patched"

    def connected_components_cpu(input_tensor):
        if input_tensor.shape[0] == 0:
            empty = torch.zeros(input_tensor.shape, dtype=torch.int64, device=input_tensor.device)
            return empty, empty.clone()
        return original(input_tensor)

    connected_components_cpu._sam3d_compat = True  # type: ignore[attr-defined]
    cc.connected_components_cpu = connected_components_cpu
    return "sam3/perflib/connected_components.py:48 (empty batch on the CPU) returns empty tensors"


def apply_video() -> list[str]:
    """What the video predictor needs beyond :func:`apply` on a machine without CUDA (idempotent).

    Returns:
        One line per workaround in effect (empty on a CUDA machine).
    """
    apply()
    for fix in (_tensor_cuda_is_identity, _empty_batch_components):
        line = fix()
        if line and line not in _APPLIED:
            _APPLIED.append(line)
            log.info("sam3 compatibility: %s", line)
    return list(_APPLIED)


def apply() -> list[str]:
    """Apply every workaround this machine needs (idempotent).

    The processor's default device (``sam3/model/sam3_image_processor.py:17``, ``device="cuda"``) and the
    text encoder's (``sam3/model/vl_combiner.py:122``) need no patch: the backend always passes its device.

    Returns:
        One line per workaround in effect, naming the upstream code it covers (empty on a CUDA machine
        with triton).
    """
    if _APPLIED:
        return list(_APPLIED)
    for fix in (_stub_edt_module, _cpu_position_encoding, _cpu_decoder_coords, _no_pin_memory):
        line = fix()
        if line:
            _APPLIED.append(line)
            log.info("sam3 compatibility: %s", line)
    return list(_APPLIED)
