"""Fetch model checkpoints from an S3 prefix into the image's checkpoint folder, verified by sha256 manifest.

    python gpu_worker/fetch_checkpoints.py fetch s3://bucket/checkpoints/v1 /opt/checkpoints [--only sam3]
    python gpu_worker/fetch_checkpoints.py verify /opt/checkpoints          # sizes + sha256 vs manifest.json
    python gpu_worker/fetch_checkpoints.py manifest /path/to/checkpoints    # writes manifest.json (once)
    python gpu_worker/fetch_checkpoints.py identity /opt/checkpoints        # what a pool declares (SAM3D_*_SHA256)

Runs at image build (``docker build --secret id=aws,...``) or at container start (``gpu_worker/entrypoint.sh``
when ``SAM3D_CHECKPOINT_URI`` is set). Exit code 0 only when every file matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sam3d_pipeline import checkpoints
from sam3d_pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download what is missing or different")
    f.add_argument("source", help="s3://bucket/prefix holding manifest.json and the files")
    f.add_argument("dest", type=Path)
    f.add_argument("--only", default="", help="comma-separated top-level folders to fetch (SAM3D_CHECKPOINT_PARTS)")
    v = sub.add_parser("verify", help="check a folder against its manifest.json")
    v.add_argument("dest", type=Path)
    v.add_argument("--sizes-only", action="store_true", help="skip hashing (fast start-up check)")
    m = sub.add_parser("manifest", help="write manifest.json for a local folder")
    m.add_argument("folder", type=Path)
    i = sub.add_parser("identity", help="print the weights identities a pool declares for these checkpoints")
    i.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            report = checkpoints.fetch(args.source, args.dest, parts=args.only or None)
            print(f"checkpoints from {args.source}: {report.summary()}")
        elif args.command == "verify":
            manifest_path = args.dest / checkpoints.MANIFEST
            files = checkpoints.parse_manifest(manifest_path.read_bytes(), str(manifest_path))
            bad = checkpoints.verify(args.dest, files, hashes=not args.sizes_only)
            if bad:
                print(f"{len(bad)} checkpoint file(s) missing or different: {', '.join(bad)}", file=sys.stderr)
                return 1
            print(f"{len(files)} checkpoint file(s) verified under {args.dest}")
        elif args.command == "identity":
            for line in checkpoints.declared_identities(args.folder):
                print(line)
        else:
            manifest = checkpoints.build_manifest(args.folder)
            (args.folder / checkpoints.MANIFEST).write_text(json.dumps(manifest, indent=1))
            print(f"wrote {args.folder / checkpoints.MANIFEST} ({len(manifest['files'])} files)")
    except (PipelineError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
