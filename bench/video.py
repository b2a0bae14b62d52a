"""Video tracking cost per frame on this machine: time and peak memory, lite and sam3 (random weights, CPU).

Each backend runs in a child process of its own, so its peak resident memory is its own. A generated clip (an
object crossing a textured background, 96x72) is decoded, sampled and tracked; figures are per sampled frame.

    .venv/bin/python bench/video.py                 # lite on 240 frames, sam3 on 5
    .venv/bin/python bench/video.py --sam3-frames 0 # lite only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(backend: str, frames: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from sam3d_pipeline import backends
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.types import SegmentRequest
    from sam3d_pipeline.video import load_video
    from tests.clips import encode, moving_object

    settings = Settings(sam3_random_init=backend == "sam3")
    clip = moving_object(frames)
    data = encode(clip.frames, "mp4")
    t = time.perf_counter()
    video = load_video(data, source="bench.mp4", settings=settings)
    decode_s = time.perf_counter() - t
    tracker = backends.get_segmenter(backend, settings)
    t = time.perf_counter()
    if hasattr(tracker, "load_tracker"):
        tracker.load_tracker()
    build_s = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    track = tracker.track([f.rgb for f in video.frames], SegmentRequest("red disc"))
    track_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(video.frames)
    return {"backend": backend, "frames": n, "decode_ms_per_frame": 1000 * decode_s / n, "build_s": build_s,
            "track_s": track_s, "track_s_per_frame": track_s / n, "peak_rss_mib": peak,
            "peak_rss_before_track_mib": rss_before, "tracked": track.tracked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lite-frames", type=int, default=240)
    parser.add_argument("--sam3-frames", type=int, default=5, help="0 skips sam3")
    parser.add_argument("--child", choices=["lite", "sam3"], help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.frames)))
        return
    runs = [("lite", args.lite_frames)] + ([("sam3", args.sam3_frames)] if args.sam3_frames else [])
    print(f"{'backend':8} {'frames':>6} {'decode ms/f':>11} {'build s':>8} {'track s/f':>10} {'peak RSS MiB':>12} "
          f"{'(before track)':>14} {'tracked':>7}")
    for backend, frames in runs:
        out = subprocess.run([sys.executable, __file__, "--child", backend, "--frames", str(frames)],
                             capture_output=True, text=True, cwd=ROOT, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
            print(f"{backend:8} failed: {reason}")
            continue
        r = json.loads(lines[-1])
        print(f"{r['backend']:8} {r['frames']:6d} {r['decode_ms_per_frame']:11.2f} {r['build_s']:8.1f} "
              f"{r['track_s_per_frame']:10.3f} {r['peak_rss_mib']:12.0f} {r['peak_rss_before_track_mib']:14.0f} "
              f"{r['tracked']:7d}")


if __name__ == "__main__":
    main()
