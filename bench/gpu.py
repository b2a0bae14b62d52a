"""GPU figures: SAM 3 per image and SAM 3D Objects per object on CUDA, with peak GPU memory.

Needs a CUDA device. Without one (or without torch) it prints one line saying so and exits 0, so
`make bench` on a laptop still completes. SAM 3 uses ``SAM3D_SAM3_CHECKPOINT`` when set, else random weights
(timings are the same; masks are meaningless). SAM 3D Objects runs only where its package and checkpoints are
installed (the gpu_worker image); otherwise that part is skipped with the reason.

Usage: python bench/gpu.py [--images 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def skip(reason: str) -> None:
    print(f"GPU benchmarks skipped: {reason}")
    print("BENCH_JSON " + json.dumps({"gpu": {"skipped": reason}}))


def photos(count: int) -> list[np.ndarray]:
    """Distinct photos from the two samples (crops, flips), so no image-level cache can help."""
    from PIL import Image

    from sam3d_pipeline.samples import sample_path

    bases = [np.asarray(Image.open(sample_path(n)).convert("RGB")) for n in ("coffee", "chelsea")]
    out = []
    for i in range(count):
        base = bases[i % 2]
        h, w = base.shape[:2]
        img = base[(i * 5) % 20 : h - 20 + (i * 5) % 20, (i * 7) % 30 : w - 30 + (i * 7) % 30]
        out.append(np.ascontiguousarray(img[:, ::-1] if i % 3 else img))
    return out


def bench_sam3(torch, images: list[np.ndarray]) -> dict:
    from sam3d_pipeline.backends import SEGMENTERS
    from sam3d_pipeline.backends.sam3_segmenter import Sam3Segmenter
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.types import SegmentRequest

    settings = Settings(sam3_random_init=not os.environ.get("SAM3D_SAM3_CHECKPOINT"), sam3_device="cuda",
                        sam3_confidence_threshold=0.0)
    reason = SEGMENTERS["sam3"].unavailable_reason(settings)
    if reason:
        return {"skipped": reason}
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    seg = Sam3Segmenter(settings)
    loaded = seg.loaded
    build_s = time.perf_counter() - t
    per_image = []
    for i, rgb in enumerate(images):
        torch.cuda.synchronize()
        t = time.perf_counter()
        seg.segment(rgb, SegmentRequest("cup" if i % 2 == 0 else "cat"))
        torch.cuda.synchronize()
        per_image.append(time.perf_counter() - t)
    warm = per_image[1:] or per_image
    return {"weights": loaded.weights, "build_s": round(build_s, 1), "first_image_s": round(per_image[0], 3),
            "per_image_median_s": round(statistics.median(warm), 3), "per_image_max_s": round(max(warm), 3),
            "images": len(images), "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def bench_sam3d(torch, images: list[np.ndarray]) -> dict:
    from sam3d_pipeline.backends import RECONSTRUCTORS, get_reconstructor
    from sam3d_pipeline.settings import get_settings

    settings = get_settings()
    reason = RECONSTRUCTORS["sam3d"].unavailable_reason(settings)
    if reason:
        return {"skipped": reason}
    recon = get_reconstructor("sam3d", settings)
    torch.cuda.reset_peak_memory_stats()
    per_object = []
    for i, rgb in enumerate(images[:3]):
        h, w = rgb.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True  # a box-shaped object; timing, not quality
        torch.cuda.synchronize()
        t = time.perf_counter()
        recon.reconstruct(rgb, mask, seed=i)
        torch.cuda.synchronize()
        per_object.append(time.perf_counter() - t)
    warm = per_object[1:] or per_object
    return {"low_memory": settings.sam3d_low_memory, "first_object_s": round(per_object[0], 1),
            "per_object_median_s": round(statistics.median(warm), 1), "objects": len(per_object),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        skip("torch is not installed (pip install -e '.[sam3]')")
        return
    if not torch.cuda.is_available():
        skip("no CUDA device on this machine (SAM 3 per image and SAM 3D per object need one)")
        return
    images = photos(args.images)
    figures = {"device": torch.cuda.get_device_name(0),
               "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    for name, fn in (("sam3", bench_sam3), ("sam3d", bench_sam3d)):
        result = fn(torch, images)
        figures |= {f"{name}_{k}": v for k, v in result.items()}
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    print("BENCH_JSON " + json.dumps({"gpu": figures}))


if __name__ == "__main__":
    main()
