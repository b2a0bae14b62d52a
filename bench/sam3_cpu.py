"""Measure the real SAM 3 backend on this machine (random weights unless SAM3D_SAM3_CHECKPOINT is set).

Prints build / set_image / text / box / click timings, peak RSS, the embedding file size and its fidelity
(decoded masks and logits vs float32 over random clicks), and the ONNX decoder's size, parity and latency.
Usage: ``.venv/bin/python bench/sam3_cpu.py [PHOTO]``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam3d_pipeline.backends.sam3 import embeddings
from sam3d_pipeline.backends.sam3.onnx_export import INPUT_NAMES, ClickDecoder, export, sample_inputs
from sam3d_pipeline.backends.sam3.segmenter import Sam3Segmenter
from sam3d_pipeline.samples import sample_path
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import Box, Point, SegmentRequest


def fidelity(decoder: ClickDecoder, exact: dict, approx: dict, height: int, width: int, trials: int = 40) -> dict:
    ious, diffs = [], []
    for seed in range(trials):
        inputs = sample_inputs(exact, height, width, clicks=1 + seed % 3, seed=100 + seed)
        with torch.no_grad():
            ref, _ = decoder(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES))
            inputs.update({k: np.ascontiguousarray(v) for k, v in approx.items()})
            got, _ = decoder(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES))
        ref, got = ref.numpy(), got.numpy()
        diffs.append(float(np.abs(ref - got).max()))
        ious += [embeddings.mask_iou(ref[0, i] > 0, got[0, i] > 0) for i in range(ref.shape[1])]
    return {"iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
            "iou_p05": float(np.percentile(ious, 5)), "logit_max_abs_diff": float(np.max(diffs)),
            "logit_median_max_abs_diff": float(np.median(diffs))}


def main() -> None:
    photo = sys.argv[1] if len(sys.argv) > 1 else str(sample_path("coffee"))
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    h, w = rgb.shape[:2]
    settings = Settings(sam3_random_init=not os.environ.get("SAM3D_SAM3_CHECKPOINT"), sam3_confidence_threshold=0.0)
    seg = Sam3Segmenter(settings)
    figures: dict = {"photo": f"{w}x{h}"}
    t = time.perf_counter()
    loaded = seg.loaded
    figures |= {"build_s": round(time.perf_counter() - t, 1), "weights": loaded.weights, "device": loaded.device}
    print(f"build_s {figures['build_s']} (weights {loaded.weights}, device {loaded.device})")
    t = time.perf_counter()
    seg.image_state(rgb)
    figures["set_image_s"] = round(time.perf_counter() - t, 1)
    print(f"set_image_s {figures['set_image_s']} ({w}x{h})")
    for label, request in (("text", SegmentRequest("coffee cup")),
                           ("box", SegmentRequest("", boxes=(Box(w * 0.2, h * 0.2, w * 0.7, h * 0.8),)))):
        t = time.perf_counter()
        result = seg.segment(rgb, request)
        figures[f"{label}_prompt_s"] = round(time.perf_counter() - t, 2)
        print(f"{label}_prompt_s {figures[f'{label}_prompt_s']} ({len(result.instances)} instances)")
    t = time.perf_counter()
    _, _, low = seg.click(rgb, [Point(w / 2, h / 2, 1)])
    figures["click_s"] = round(time.perf_counter() - t, 3)
    print(f"click_s {figures['click_s']}")
    t = time.perf_counter()
    seg.click(rgb, [Point(w / 2, h / 2, 1), Point(10, 10, 0)], mask_input=low)
    figures["click_with_mask_s"] = round(time.perf_counter() - t, 3)
    print(f"click_with_mask_s {figures['click_with_mask_s']}")

    feats = seg.embeddings(rgb)
    float_bytes = sum(v.nbytes for v in feats.values())
    decoder = ClickDecoder(loaded.model.inst_interactive_predictor.model).eval()
    for bits in (8, 6, {"image_embed": 8, "high_res_feats_1": 8, "high_res_feats_0": 4}):
        t = time.perf_counter()
        blob = embeddings.encode(feats, bits)
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        approx = embeddings.decode(blob)
        dec_s = time.perf_counter() - t
        fid = fidelity(decoder, feats, approx, h, w)
        name = f"{bits}bit" if isinstance(bits, int) else "8-8-4bit"
        figures[f"embeddings_{name}_bytes"] = len(blob)
        figures[f"embeddings_{name}_mask_iou_mean"] = round(fid["iou_mean"], 4)
        figures[f"embeddings_{name}_mask_iou_min"] = round(fid["iou_min"], 4)
        print(f"embeddings bits={bits}: {len(blob)} bytes (float32 {float_bytes}); encode {enc_s:.2f} s, "
              f"decode {dec_s:.2f} s; " + ", ".join(f"{k} {v:.5f}" for k, v in fid.items()))

    with tempfile.TemporaryDirectory() as tmp:
        report = export(loaded.model, Path(tmp) / "decoder.onnx", quantize=True)
    print("onnx " + ", ".join(f"{k} {v}" for k, v in report.items() if "path" not in k))
    figures["embeddings_float32_bytes"] = float_bytes
    figures |= {"onnx_" + k: (round(v, 6) if isinstance(v, float) else v) for k, v in report.items() if "path" not in k}
    figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(f"peak_rss_gib {figures['peak_rss_gib']}")
    print("BENCH_JSON " + json.dumps({"sam3_cpu": figures}))


if __name__ == "__main__":
    main()
