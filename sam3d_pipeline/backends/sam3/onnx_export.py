"""ONNX export of SAM 3's click decoder (prompt encoder + mask decoder of the interactive predictor).

The exported graph takes the three feature tensors from ``Sam3Segmenter.embeddings`` (or decoded from
``embeddings.bin``) and the clicks, so a browser can decode masks locally with onnxruntime-web:

inputs: ``image_embed`` (1,256,72,72) f32, ``high_res_feats_0`` (1,32,288,288) f32, ``high_res_feats_1``
(1,64,144,144) f32, ``point_coords`` (1,N,2) f32 pixels of the original image (x, y), ``point_labels``
(1,N) f32 (1 object, 0 background, 2/3 box corners, -1 the padding point that must end a click-only
prompt), ``mask_input`` (1,1,288,288) f32 logits, ``has_mask_input`` (1,) f32 (0 or 1), ``orig_im_size``
(2,) f32 ``(H, W)``.
outputs: ``low_res_masks`` (1,4,288,288) f32 logits (index 0 the single-mask output, 1-3 the multimask
outputs), ``iou_predictions`` (1,4) f32.
Imports torch; used by ``sam3d-pipeline export-decoder`` only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAMES = ["image_embed", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels",
               "mask_input", "has_mask_input", "orig_im_size"]
OUTPUT_NAMES = ["low_res_masks", "iou_predictions"]


class ClickDecoder(nn.Module):
    """Prompt encoder + mask decoder of ``model.inst_interactive_predictor.model`` as one traceable module.

    Mirrors ``SAM3InteractiveImagePredictor._prep_prompts``/``_predict`` (``sam3/model/sam1_task_predictor.py``)
    and ``PromptEncoder._embed_points``/``_embed_masks`` (``sam3/sam/prompt_encoder.py``) with tensor ops
    only, calling the real sub-modules for every learned part.
    """

    def __init__(self, tracker):
        super().__init__()
        self.prompt_encoder = tracker.sam_prompt_encoder
        self.mask_decoder = tracker.sam_mask_decoder
        self.resolution = float(tracker.image_size)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = (coords + 0.5) / self.resolution
        emb = pe.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1)
        emb = torch.where(labels == -1, torch.zeros_like(emb) + pe.not_a_point_embed.weight, emb)
        for i in range(pe.num_point_embeddings):
            emb = torch.where(labels == i, emb + pe.point_embeddings[i].weight, emb)
        return emb

    def _dense_pe(self, image_embed: torch.Tensor) -> torch.Tensor:
        """``PromptEncoder.get_dense_pe()`` computed in the graph (``PositionEmbeddingRandom.forward``), so the
        export does not carry it as a 5.3 MB constant."""
        grid = torch.ones_like(image_embed[0, 0])
        h, w = grid.shape
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        return self.prompt_encoder.pe_layer._pe_encoding(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)

    def forward(self, image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, mask_input,
                has_mask_input, orig_im_size):
        scale = torch.stack([orig_im_size[1], orig_im_size[0]]).reshape(1, 1, 2)
        coords = point_coords / scale * self.resolution
        sparse = self._embed_points(coords, point_labels)
        has = has_mask_input.reshape(1, 1, 1, 1)
        dense = has * self.prompt_encoder.mask_downscaling(mask_input) + (1 - has) * (
            self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        )
        low_res, iou, _, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embed,
            image_pe=self._dense_pe(image_embed),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return torch.clamp(low_res, -32.0, 32.0), iou


def sample_inputs(features: dict[str, np.ndarray] | None, height: int, width: int, clicks: int = 2,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Decoder inputs with random clicks (plus the padding point) on ``features`` (random when None)."""
    rng = np.random.default_rng(seed)
    if features is None:
        features = {
            "image_embed": rng.standard_normal((1, 256, 72, 72)).astype(np.float32),
            "high_res_feats_0": rng.standard_normal((1, 32, 288, 288)).astype(np.float32) * 0.1,
            "high_res_feats_1": rng.standard_normal((1, 64, 144, 144)).astype(np.float32) * 0.3,
        }
    coords = np.concatenate([rng.uniform([0, 0], [width, height], (clicks, 2)), np.zeros((1, 2))])
    labels = np.concatenate([rng.integers(0, 2, clicks), [-1]])
    return {
        **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in features.items()},
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, 288, 288), np.float32),
        "has_mask_input": np.zeros((1,), np.float32),
        "orig_im_size": np.array([height, width], np.float32),
    }


def cpu_decoder(model) -> ClickDecoder:
    """A float32 copy of the live model's click decoder on the CPU. The export and its check run on the copy: the
    live prompt encoder and mask decoder stay where they are (on a GPU worker: CUDA, maybe half precision), and
    the exported graph is float32 whatever the model runs in (the browser's onnxruntime-web decodes float32)."""
    import copy

    tracker = model.inst_interactive_predictor.model
    live = ClickDecoder(tracker)
    return copy.deepcopy(live).to(device="cpu", dtype=torch.float32).eval()


def export(model, out_path: Path, *, quantize: bool = False, height: int = 400, width: int = 600) -> dict:
    """Export the click decoder of a built SAM 3 model and check it against torch on fresh random inputs.

    Args:
        model: a ``Sam3Image`` built with ``enable_inst_interactivity=True``, on any device and dtype (the
            export runs on a CPU float32 copy of its decoder, ``cpu_decoder``).
        out_path: where to write the ``.onnx`` file; ``quantize`` also writes ``<stem>.quant.onnx`` (uint8
            dynamic quantisation).

    Returns:
        ``{"path", "size_bytes", "max_abs_diff", "iou_max_abs_diff", "latency_ms", "quant_path",
        "quant_size_bytes", "quant_max_abs_diff"}``: differences are vs torch on inputs not used for export,
        latency is the median of 20 onnxruntime runs on this machine.

    Raises:
        RuntimeError: the exported model disagrees with torch beyond 1e-3 (logits).
    """
    import onnxruntime as ort

    decoder = cpu_decoder(model)
    example = sample_inputs(None, height, width, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            decoder, args, str(out_path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            opset_version=17, dynamo=False,
        )
    check = sample_inputs(None, height + 37, width - 51, clicks=3, seed=1)
    with torch.no_grad():
        ref_low, ref_iou = (t.numpy() for t in decoder(*(torch.from_numpy(check[n]) for n in INPUT_NAMES)))
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    low, iou = session.run(OUTPUT_NAMES, check)
    diff = float(np.abs(low - ref_low).max())
    if not math.isfinite(diff) or diff > 1e-3:
        raise RuntimeError(f"exported decoder {out_path} differs from torch by {diff} (limit 1e-3)")
    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        session.run(OUTPUT_NAMES, check)
        latencies.append((time.perf_counter() - started) * 1000)
    report = {
        "path": str(out_path), "size_bytes": out_path.stat().st_size, "max_abs_diff": diff,
        "iou_max_abs_diff": float(np.abs(iou - ref_iou).max()), "latency_ms": float(np.median(latencies)),
    }
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quant_path = out_path.with_suffix(".quant.onnx")
        quantize_dynamic(str(out_path), str(quant_path), weight_type=QuantType.QUInt8)
        q_low, _ = ort.InferenceSession(str(quant_path), providers=["CPUExecutionProvider"]).run(OUTPUT_NAMES, check)
        report.update(quant_path=str(quant_path), quant_size_bytes=quant_path.stat().st_size,
                      quant_max_abs_diff=float(np.abs(q_low - ref_low).max()))
    return report
