"""The review page's click decoder: prompt rules, mask choice and upsampling, plus where its files live.

The browser runs the exported decoder (``backends/sam3_onnx.py``) with onnxruntime-web
(``review/static/clickdecoder.js``); this module is the same computation with onnxruntime in Python, so
tests and benchmarks can check that the mask a person sees is the mask the decoder gives. numpy only, apart
from :class:`OnnxClickDecoder` (onnxruntime, imported when used).

Files (keys relative to the output root):
    ``<prefix>/review/embeddings.bin``                   the image's decoder inputs (``embeddings.py``),
                                                         gzip-encoded
    ``_decoders/<segmenter version>/click-decoder.onnx``  the decoder (uint8 weights), one per model version;
                                                         ``click-decoder-float32.onnx`` with float32 weights
                                                         (``SAM3D_REVIEW_DECODER_WEIGHTS``)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sam3d_pipeline import keys
from sam3d_pipeline.keys import DECODER_NAME
from sam3d_pipeline.types import Point

LOW_RES = 288
STABILITY_DELTA = 0.05  # the tracker's MaskDecoder: dynamic_multimask_stability_delta / _thresh
STABILITY_THRESH = 0.98
MAX_HOLE_AREA = 256  # SAM3InteractiveImagePredictor(max_hole_area=256)


def embeddings_key(prefix: str) -> str:
    """``<prefix>/review/embeddings.bin``: the image's decoder inputs."""
    return keys.RunKeys(prefix).embeddings


def decoder_key(segmenter_version: str, weights: str = "uint8") -> str:
    """Where the decoder of one model version lives (immutable: a new checkpoint has a new version).

    Raises:
        ValueError: ``weights`` is neither ``uint8`` nor ``float32``.
    """
    return keys.decoder_key(segmenter_version, weights)


def prompt_inputs(points: Sequence[Point], box: tuple[float, float, float, float] | None) -> dict[str, np.ndarray]:
    """``point_coords`` and ``point_labels`` as SAM 3's interactive predictor builds them
    (``SAM3InteractiveImagePredictor._predict``): the box's two corners first (labels 2, 3), then the clicks
    (label 1 object, 0 background), then the padding point (-1), which the prompt encoder always appends."""
    coords = [] if box is None else [(box[0], box[1]), (box[2], box[3])]
    labels = [] if box is None else [2.0, 3.0]
    coords += [(p.x, p.y) for p in points] + [(0.0, 0.0)]
    labels += [1.0 if p.label else 0.0 for p in points] + [-1.0]
    return {"point_coords": np.asarray(coords, np.float32)[None], "point_labels": np.asarray(labels, np.float32)[None]}


def choose_mask(low_res: np.ndarray, iou: np.ndarray, n_points: int, has_box: bool) -> int:
    """Which of the decoder's four outputs the predictor returns (``MaskDecoder.forward``).

    One click alone: the best multimask output (1-3) by predicted IoU. Otherwise the single-mask output (0),
    unless its stability score (area above +0.05 over area above -0.05) is below 0.98: then the best
    multimask output (``_dynamic_multimask_via_stability``).
    """
    iou = np.asarray(iou, np.float32).reshape(-1)
    best_multi = 1 + int(np.argmax(iou[1:4]))
    if n_points <= 1 and not has_box:
        return best_multi
    single = np.asarray(low_res[0])
    union = int(np.count_nonzero(single > -STABILITY_DELTA))
    stability = np.count_nonzero(single > STABILITY_DELTA) / union if union else 1.0
    return 0 if stability >= STABILITY_THRESH else best_multi


def fill_holes(logits: np.ndarray) -> np.ndarray:
    """``SAM1Transforms.postprocess_masks``: background regions (logit <= 0, 8-connected) of at most 256
    low-resolution pixels become foreground (logit 10)."""
    from scipy import ndimage

    logits = np.asarray(logits, np.float32)
    labels, _ = ndimage.label(logits <= 0, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel())
    small = areas <= MAX_HOLE_AREA
    small[0] = False
    return np.where(small[labels], np.float32(10.0), logits)


def upsample_logits(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of a ``(288, 288)`` logit map to ``(height, width)`` float32 (PyTorch's
    ``align_corners=False``). The same arithmetic as ``upsampleMask`` in ``clickdecoder.js``."""
    logits = np.asarray(logits, np.float32)
    size = logits.shape[0]

    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum(0.0, (np.arange(n) + 0.5) * (size / n) - 0.5)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, size - 1), (src - i0).astype(np.float32)

    x0, x1, wx = axis(width)
    y0, y1, wy = axis(height)
    top = logits[y0][:, x0] + (logits[y0][:, x1] - logits[y0][:, x0]) * wx
    bottom = logits[y1][:, x0] + (logits[y1][:, x1] - logits[y1][:, x0]) * wx
    return top + (bottom - top) * wy[:, None]


def upsample_mask(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """The mask the page shows: :func:`upsample_logits` thresholded at 0."""
    return upsample_logits(logits, width, height) > 0


class OnnxClickDecoder:
    """The exported decoder in onnxruntime (CPU), with the page's prompt and mask rules."""

    def __init__(self, model: Path | bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def decode(self, features: dict[str, np.ndarray], points: Sequence[Point],
               box: tuple[float, float, float, float] | None, width: int, height: int) -> tuple[np.ndarray, float]:
        """The mask (``(height, width)`` bool) and predicted IoU the page shows for these clicks and box."""
        low, iou = self.raw(features, points, box, width, height)
        index = choose_mask(low[0], iou[0], len(points), box is not None)
        return upsample_mask(fill_holes(low[0, index]), width, height), float(iou[0, index])

    def raw(self, features: dict[str, np.ndarray], points: Sequence[Point],
            box: tuple[float, float, float, float] | None, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoder's outputs: ``low_res_masks`` (1, 4, 288, 288) and ``iou_predictions`` (1, 4)."""
        feeds = {
            **{k: np.ascontiguousarray(features[k], np.float32)
               for k in ("image_embed", "high_res_feats_0", "high_res_feats_1")},
            **prompt_inputs(points, box),
            "mask_input": np.zeros((1, 1, LOW_RES, LOW_RES), np.float32),
            "has_mask_input": np.zeros((1,), np.float32),
            "orig_im_size": np.array([height, width], np.float32),
        }
        low, iou = self.session.run(["low_res_masks", "iou_predictions"], feeds)
        return low, iou


def publish_review_assets(segmenter: object, rgb: np.ndarray, storage, prefix: str,
                          weights: str = "uint8") -> dict[str, str] | None:
    """Store what the review page's in-browser decoder needs for this photo, unless already stored.

    ``<prefix>/review/embeddings.bin`` (per photo, ~3.5 MB gzip-encoded) and
    ``_decoders/<version>/click-decoder.onnx`` (per model version, exported and checked against torch the first
    time a version is seen). Both writes are
    whole-object, so a reader never sees half a file; two runs racing on a new version write the same bytes.

    Args:
        segmenter: the segmenter that produced (or will produce) the masks; ignored unless it is an
            ``Embedder`` (``lite`` has no click decoder: the page then refines on the server).
        storage: the run's output ``Storage``.
        weights: the decoder's weights, ``uint8`` (dynamic quantisation) or ``float32``.

    Returns:
        ``{"embeddings_key", "decoder_key"}`` relative to the storage root, or None without a decoder.
    """
    import tempfile

    from sam3d_pipeline.backends.base import Embedder
    from sam3d_pipeline.backends.sam3 import embeddings

    if not isinstance(segmenter, Embedder):
        return None
    keys = {"embeddings_key": embeddings_key(prefix), "decoder_key": decoder_key(segmenter.version(), weights)}
    if not storage.exists(keys["decoder_key"]):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / DECODER_NAME
            segmenter.export_click_decoder(path, quantized=weights == "uint8")
            storage.write_bytes(keys["decoder_key"], path.read_bytes(), content_type="application/octet-stream")
    if not storage.exists(keys["embeddings_key"]):
        storage.write_bytes(keys["embeddings_key"], embeddings.compress(embeddings.encode(segmenter.embeddings(rgb))),
                            content_type="application/octet-stream", content_encoding="gzip")
    return keys
