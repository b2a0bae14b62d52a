"""Smoke test for the GPU image: SAM 3 and SAM 3D Objects on one bundled photo, with timings and peak GPU memory.

    python gpu_worker/smoke.py [--prompt "coffee cup"] [--low-memory] [--out /tmp/smoke]

Prints one line per stage (seconds, peak GPU memory in GiB), then SAM 3D Objects' own stages (point map, sparse
structure, structured latent, decode, post-processing), and writes the mask, GLB and PLY to ``--out``.
Exit code 0 only when both models ran on the GPU and produced a non-empty mask, mesh and splat.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="coffee cup")
    parser.add_argument("--low-memory", action="store_true", help="SAM 3D Objects stage-by-stage loading")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sam3d-smoke"))
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("error: torch is not installed: run this inside the gpu_worker image", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA device visible (is the container started with a GPU?)", file=sys.stderr)
        return 2

    from sam3d_pipeline import backends
    from sam3d_pipeline.glb import mesh_to_glb
    from sam3d_pipeline.images import load_image
    from sam3d_pipeline.masks import mask_to_png, select_instance
    from sam3d_pipeline.samples import sample_path
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.types import SegmentRequest

    settings = Settings(sam3d_low_memory=args.low_memory)
    photo = sample_path("coffee")
    image = load_image(Path(photo).read_bytes(), source=str(photo), max_pixels=settings.max_pixels)
    print(f"device: {torch.cuda.get_device_name(0)}, {_gib(torch.cuda.get_device_properties(0).total_memory):.1f} GiB;"
          f" photo {photo} {image.width}x{image.height}; low_memory={args.low_memory}")
    rows = []

    def stage(name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        rows.append((name, time.perf_counter() - t, _gib(torch.cuda.max_memory_allocated())))
        print(f"{name:<22} {rows[-1][1]:8.2f} s   peak {rows[-1][2]:6.2f} GiB", flush=True)
        return value

    segmenter = stage("sam3 load", lambda: backends.get_segmenter("sam3", settings))
    seg = stage("sam3 segment", lambda: segmenter.segment(image.rgb, SegmentRequest(prompt=args.prompt)))
    selected = select_instance(seg.instances, None)
    if selected is None:
        print(f"error: SAM 3 found nothing for {args.prompt!r}", file=sys.stderr)
        return 1
    segmenter = None  # free SAM 3 before SAM 3D Objects loads
    backends.clear_cache()
    torch.cuda.empty_cache()
    reconstructor = backends.get_reconstructor("sam3d", settings)
    stage("sam3d load", reconstructor._load)
    with profile_stages(reconstructor._inference._pipeline, torch) as stages:
        recon = stage("sam3d reconstruct",
                      lambda: reconstructor.reconstruct(image.rgb, seg.instances[selected].mask))
    for name, row in stages.items():
        print(f"  sam3d {name:<24} {row['s']:8.2f} s   peak {row['peak_gib']:6.2f} GiB", flush=True)
    # The stages reset the peak counter as they start: the reconstruct row's peak is the largest of theirs.
    rows[-1] = (rows[-1][0], rows[-1][1], max([rows[-1][2]] + [r["peak_gib"] for r in stages.values()]))
    print(f"sam3d backend: {recon.backend.as_dict()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask.png").write_bytes(mask_to_png(seg.instances[selected].mask))
    (args.out / "object.glb").write_bytes(mesh_to_glb(recon.mesh, reconstructor=recon.backend.key()))
    if recon.splat_ply:
        (args.out / "object.ply").write_bytes(recon.splat_ply)
    print(f"mask {seg.instances[selected].area} px (score {seg.instances[selected].score:.2f}); mesh {recon.stats};"
          f" pose {recon.pose}; outputs in {args.out}")
    print(f"total {sum(r[1] for r in rows):.1f} s, peak GPU memory {max(r[2] for r in rows):.2f} GiB")
    ok = recon.splat_ply is not None and len(recon.mesh.faces) > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
