"""Smoke test for a GPU image: its model on one bundled photo, with timings and peak GPU memory.

    python gpu_worker/smoke.py [--stages segment|reconstruct|all] [--prompt "coffee cup"] [--low-memory] [--out D]

The default ``--stages`` is the image's own (``SAM3D_GPU_WORKER_STAGES``): the SAM 3 image segments and exports the
review page's click decoder; the SAM 3D Objects image reconstructs from a ``lite`` mask. Prints one line per step
(seconds, peak GPU memory in GiB), then SAM 3D Objects' own stages (point map, sparse structure, structured latent,
decode, post-processing), and writes the mask, decoder, GLB and PLY to ``--out``. Exit code 0 only when the
image's model ran on the GPU and produced a non-empty mask (and a mesh and splat).

``profile_stages`` (also used by ``bench/gpu.py``) times each SAM 3D Objects stage and records its peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# SAM 3D Objects' stage methods on its pipeline (inference_pipeline_pointmap.py / inference_pipeline.py @ cf06676),
# in the order run() calls them.
SAM3D_STAGES = ("compute_pointmap", "sample_sparse_structure", "sample_slat", "decode_slat",
                "postprocess_slat_output", "run_post_optimization")


def _gib(n_bytes: int) -> float:
    return n_bytes / 2**30


@contextlib.contextmanager
def profile_stages(pipeline: Any, torch: Any) -> Iterator[dict[str, dict[str, float]]]:
    """Time each SAM 3D Objects stage and record its peak GPU memory while the block runs.

    Wraps the stage methods on the pipeline instance (over the low-memory offloader's wrappers, so moving a
    stage's networks in and out counts towards that stage) and restores them on exit.

    Yields:
        ``{stage: {"s": seconds summed over calls, "peak_gib": max of torch.cuda.max_memory_allocated, "calls": n}}``
        (filled as stages run).
    """
    figures: dict[str, dict[str, float]] = {}
    originals = {name: pipeline.__dict__.get(name) for name in SAM3D_STAGES if hasattr(pipeline, name)}

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                row = figures.setdefault(name, {"s": 0.0, "peak_gib": 0.0, "calls": 0})
                row["s"] += time.perf_counter() - start
                row["peak_gib"] = max(row["peak_gib"], _gib(torch.cuda.max_memory_allocated()))
                row["calls"] += 1

        return run

    for name in originals:
        setattr(pipeline, name, timed(name, getattr(pipeline, name)))
    try:
        yield figures
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(pipeline, name)  # the class's method again
            else:
                setattr(pipeline, name, original)


class StageClock:
    """Times a step on the GPU and records its peak memory (one printed row per step)."""

    def __init__(self, torch: Any) -> None:
        self.torch, self.rows = torch, []

    def __call__(self, name: str, fn: Any) -> Any:
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        self.rows.append((name, time.perf_counter() - t, _gib(torch.cuda.max_memory_allocated())))
        print(f"{name:<22} {self.rows[-1][1]:8.2f} s   peak {self.rows[-1][2]:6.2f} GiB", flush=True)
        return value


def smoke_sam3(settings: Any, image: Any, prompt: str, out: Path, stage: StageClock) -> Any:
    """SAM 3 as the SAM 3 image's sessions run it: load, segment, and export the review page's click decoder
    (the live model on CUDA; the export works on a CPU float32 copy). Returns the best mask, or None."""
    from sam3d_pipeline import backends
    from sam3d_pipeline.masks import mask_to_png, select_instance
    from sam3d_pipeline.types import SegmentRequest

    segmenter = stage("sam3 load", lambda: backends.get_segmenter("sam3", settings))
    seg = stage("sam3 segment", lambda: segmenter.segment(image.rgb, SegmentRequest(prompt=prompt)))
    out.mkdir(parents=True, exist_ok=True)
    report = stage("sam3 click decoder", lambda: segmenter.export_click_decoder(out / "click-decoder.onnx"))
    print(f"sam3 backend: {segmenter.info().as_dict()}; click decoder {report['size_bytes']:,} bytes, "
          f"max |onnx - torch| {report['max_abs_diff']:.2e}")
    selected = select_instance(seg.instances, None)
    if selected is None:
        print(f"error: SAM 3 found nothing for {prompt!r}", file=sys.stderr)
        return None
    mask = seg.instances[selected].mask
    (out / "mask.png").write_bytes(mask_to_png(mask))
    print(f"mask {seg.instances[selected].area} px (score {seg.instances[selected].score:.2f})")
    return mask


def smoke_sam3d(settings: Any, image: Any, mask: Any, out: Path, stage: StageClock, torch: Any) -> bool:
    """SAM 3D Objects as the SAM 3D image's sessions run it, with per-stage figures. True when a mesh and a splat
    came out."""
    from sam3d_pipeline import backends
    from sam3d_pipeline.export.glb import mesh_to_glb

    reconstructor = backends.get_reconstructor("sam3d", settings)
    stage("sam3d load", reconstructor.load_model)
    with profile_stages(reconstructor.pipeline, torch) as stages:
        recon = stage("sam3d reconstruct", lambda: reconstructor.reconstruct(image.rgb, mask))
    for name, row in stages.items():
        print(f"  sam3d {name:<24} {row['s']:8.2f} s   peak {row['peak_gib']:6.2f} GiB", flush=True)
    # The stages reset the peak counter as they start: the reconstruct row's peak is the largest of theirs.
    name, seconds, peak = stage.rows[-1]
    stage.rows[-1] = (name, seconds, max([peak] + [r["peak_gib"] for r in stages.values()]))
    print(f"sam3d backend: {recon.backend.as_dict()}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "object.glb").write_bytes(mesh_to_glb(recon.mesh, reconstructor=recon.backend.key()))
    if recon.splat_ply:
        (out / "object.ply").write_bytes(recon.splat_ply)
    print(f"mesh {recon.stats}; pose {recon.pose}; outputs in {out}")
    return recon.splat_ply is not None and len(recon.mesh.faces) > 0


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="coffee cup")
    parser.add_argument("--stages", choices=("segment", "reconstruct", "all"),
                        default=os.environ.get("SAM3D_GPU_WORKER_STAGES", "all"),
                        help="what this image serves (default: SAM3D_GPU_WORKER_STAGES): segment runs SAM 3 and the "
                        "click-decoder export; reconstruct runs SAM 3D Objects on a lite mask; all runs both")
    parser.add_argument("--low-memory", action="store_true", help="SAM 3D Objects stage-by-stage loading")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sam3d-smoke"))
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("error: torch is not installed: run this inside a gpu_worker image", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA device visible (is the container started with a GPU?)", file=sys.stderr)
        return 2

    from sam3d_pipeline import backends
    from sam3d_pipeline.images import load_image
    from sam3d_pipeline.samples import sample_path
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.types import SegmentRequest

    settings = Settings(sam3d_low_memory=args.low_memory)
    photo = sample_path("coffee")
    image = load_image(Path(photo).read_bytes(), source=str(photo), max_pixels=settings.max_pixels)
    print(f"device: {torch.cuda.get_device_name(0)}, {_gib(torch.cuda.get_device_properties(0).total_memory):.1f} GiB;"
          f" photo {photo} {image.width}x{image.height}; stages={args.stages}; low_memory={args.low_memory}")
    stage = StageClock(torch)
    mask = None
    if args.stages in ("segment", "all"):
        mask = smoke_sam3(settings, image, args.prompt, args.out, stage)
        if mask is None:
            return 1
        backends.clear_cache()  # free SAM 3 before SAM 3D Objects loads
        torch.cuda.empty_cache()
    ok = True
    if args.stages in ("reconstruct", "all"):
        if mask is None:  # the SAM 3D image has no SAM 3: the lite segmenter's mask stands in
            seg = backends.get_segmenter("lite", settings).segment(image.rgb, SegmentRequest(prompt=args.prompt))
            mask = seg.instances[0].mask
        ok = smoke_sam3d(settings, image, mask, args.out, stage, torch)
    print(f"total {sum(r[1] for r in stage.rows):.1f} s, peak GPU memory {max(r[2] for r in stage.rows):.2f} GiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
