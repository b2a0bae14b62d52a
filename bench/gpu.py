"""GPU figures: SAM 3 per image and SAM 3D Objects per object and per stage on CUDA, with peak GPU memory.

Needs a CUDA device. Without one (or without torch) it prints one line saying so and exits 0, so
`make bench` on a laptop still completes. SAM 3 uses ``SAM3D_SAM3_CHECKPOINT`` when set, else random weights
(timings and memory are the same with the real architecture; masks are meaningless). SAM 3D Objects runs only
where its package and checkpoints are installed (the gpu_worker image); otherwise that part is skipped with the
reason. It runs twice, default placement then low-memory mode (``SAM3D_SAM3D_LOW_MEMORY``), each with its load
time, per-object time, and per stage (point map, sparse structure, structured latent, decode, post-processing)
seconds and peak GPU memory (``gpu_worker/smoke.py``'s ``profile_stages``); an out-of-memory mode is reported as
such and the next one still runs. These are the figures that replace the estimates in ``bench/sam3d_memory.py``
and gpu_worker/README.md. One command, about 5-8 minutes on an A10G (two loads of ~13 GB of checkpoints).

Usage: python bench/gpu.py [--images 5] [--objects 2] [--modes default,low-memory] [--budget-s 360]
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
sys.path.insert(0, str(ROOT / "gpu_worker"))


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
    from sam3d_pipeline.backends.sam3.segmenter import Sam3Segmenter
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


# SAM 3D Objects modes: settings over the deployment's (quality: SAM3D_SAM3D_QUALITY, upstream's own levers).
MODES = {"default": {}, "low-memory": {"sam3d_low_memory": True}, "fast": {"sam3d_quality": "fast"},
         "best": {"sam3d_quality": "best"}}


def bench_sam3d_mode(torch, images: list[np.ndarray], update: dict, objects: int) -> dict:
    """One SAM 3D Objects mode: load, then ``objects`` reconstructions, with per-stage figures; the model is
    dropped and its memory freed before returning (also after an out-of-memory error)."""
    import gc

    from smoke import profile_stages

    from sam3d_pipeline.backends import RECONSTRUCTORS
    from sam3d_pipeline.backends.sam3d_reconstructor import Sam3dReconstructor
    from sam3d_pipeline.settings import get_settings

    settings = get_settings().model_copy(update=update)
    reason = RECONSTRUCTORS["sam3d"].unavailable_reason(settings)
    if reason:
        return {"skipped": reason}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    recon = Sam3dReconstructor(settings)
    out: dict = {}
    try:
        t = time.perf_counter()
        try:
            recon.load_model()
        except torch.cuda.OutOfMemoryError as exc:
            return {"load": f"out of memory: {str(exc).splitlines()[0][:120]}",
                    "load_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        torch.cuda.synchronize()
        out |= {"load_s": round(time.perf_counter() - t, 1),
                "load_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "resident_after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                "backend": recon.info().as_dict() | {"limits": None}}
        per_object: list[float] = []
        with profile_stages(recon.pipeline, torch) as stages:
            try:
                for i, rgb in enumerate(images[:objects]):
                    h, w = rgb.shape[:2]
                    mask = np.zeros((h, w), bool)
                    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True  # a box-shaped object: timing, not quality
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    recon.reconstruct(rgb, mask, seed=i)
                    torch.cuda.synchronize()
                    per_object.append(time.perf_counter() - t)
            except torch.cuda.OutOfMemoryError as exc:
                out["reconstruct"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
        if per_object:
            warm = per_object[1:] or per_object
            out |= {"first_object_s": round(per_object[0], 1),
                    "per_object_median_s": round(statistics.median(warm), 1), "objects": len(per_object)}
        out["stages"] = {name: {"s_per_object": round(row["s"] / max(len(per_object), 1), 2),
                                "calls": row["calls"], "peak_gib": round(row["peak_gib"], 2)}
                         for name, row in stages.items()}
        out["peak_gib"] = max([out["load_peak_gib"]] + [row["peak_gib"] for row in out["stages"].values()])
        return out
    finally:
        recon.unload()
        del recon
        gc.collect()
        torch.cuda.empty_cache()


def bench_sam3d(torch, images: list[np.ndarray], modes: list[str], objects: int, deadline: float) -> dict:
    """Each mode in turn; a mode that would start after ``deadline`` (``time.monotonic()``) is skipped, so the
    whole command stays within 10 minutes."""
    out = {}
    for mode in modes:
        if time.monotonic() > deadline:
            out[mode.replace("-", "_")] = {"skipped": "time budget of bench/gpu.py spent (--budget-s)"}
            continue
        result = bench_sam3d_mode(torch, images, MODES[mode], objects)
        out[mode.replace("-", "_")] = result
        print(f"sam3d {mode}: " + json.dumps(result), flush=True)
        if "skipped" in result:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--objects", type=int, default=2, help="SAM 3D Objects reconstructions per mode")
    parser.add_argument("--modes", default="default,fast,low-memory,best",
                        help=f"SAM 3D Objects modes, in order, of {', '.join(MODES)}")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no SAM 3D Objects mode after this many seconds (a mode takes ~2-4 min)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
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
    import importlib.util

    if importlib.util.find_spec("sam3") is None:  # the SAM 3D Objects image has no SAM 3 (gpu_worker/README.md)
        figures["sam3_skipped"] = "sam3 is not installed here"
        print("sam3: skipped (not installed here)", flush=True)
    else:
        result = bench_sam3(torch, images)
        figures |= {f"sam3_{k}": v for k, v in result.items()}
        print("sam3: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
        from sam3d_pipeline.backends.sam3.segmenter import clear_models

        clear_models()  # free SAM 3 before SAM 3D Objects loads, as a worker does between stages
        torch.cuda.empty_cache()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    figures |= {f"sam3d_{k}": v for k, v in bench_sam3d(torch, images, modes, args.objects, deadline).items()}
    print("BENCH_JSON " + json.dumps({"gpu": figures}))


if __name__ == "__main__":
    main()
