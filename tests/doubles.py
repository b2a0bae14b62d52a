"""The SAM 3D Objects double's files: its folder (put on sys.path as ``inference``) and a config for it."""

from __future__ import annotations

import json
from pathlib import Path

DOUBLE_DIR = Path(__file__).parent / "sam3d_double"


def double_config(folder: Path) -> Path:
    """A SAM 3D Objects config with its (placeholder) checkpoint files beside it, for the double."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.ckpt", "b.ckpt"):
        (folder / name).write_bytes(b"w")
    (folder / "pipeline.yaml").write_text(json.dumps({"ss_generator_ckpt_path": "a.ckpt",
                                                      "slat_generator_ckpt_path": "b.ckpt"}))
    return folder / "pipeline.yaml"
