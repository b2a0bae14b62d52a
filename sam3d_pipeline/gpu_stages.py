"""The two GPU stages as plain functions that talk through storage keys, never pixels.

``segment-image`` and ``reconstruct-objects`` (flows in ``flows/gpu_stages.py``) call these. They read the
photo from its URI and masks from storage, and write their results under the run's deterministic prefix:

    <prefix>/stages/segment/segmentation.json       instances (score, box, area), backend, messages
    <prefix>/stages/segment/mask-<i>.png            one PNG per instance
    <prefix>/stages/reconstruct/object.glb           mesh (vertex colours)
    <prefix>/stages/reconstruct/object.ply           Gaussian splat, when the backend makes one
    <prefix>/stages/reconstruct/reconstruction.json  pose, stats, backend (written last)

The caller (``image-to-3d`` in deployment mode) loads them back with ``load_segmentation`` and
``load_reconstruction``. Each JSON is written after the files it describes, so a stage's output is
complete once its JSON exists.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from . import backends, clickdecoder
from .errors import InputError
from .images import LoadedImage, load_image
from .masks import mask_from_png, mask_to_png
from .settings import Settings, get_settings
from .storage import open_storage, read_input
from .types import BackendInfo, Box, Instance, Point, Reconstruction, Segmentation, SegmentRequest

SEGMENT_DIR = "stages/segment"
RECONSTRUCT_DIR = "stages/reconstruct"


class SegmentParams(BaseModel):
    """What ``segment-image`` segments (already validated against the image by the caller)."""

    prompt: str = Field(min_length=1)
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list)
    points: list[Point] = Field(default_factory=list)

    def request(self) -> SegmentRequest:
        return SegmentRequest(
            prompt=self.prompt,
            boxes=tuple(Box(*b) for b in self.boxes),
            points=tuple(self.points),
        )


class ReconstructJobParam(BaseModel):
    """One (image, mask) job for ``reconstruct-objects``.

    Attributes:
        image: URI of the photo (local path or ``s3://bucket/key``).
        mask: key of the mask PNG, relative to the output root.
        output: key prefix (relative to the output root) where the job's files go.
        seed: sampling seed.
        photo_id: jobs with the same id share one point map (default: the image URI).
    """

    image: str
    mask: str
    output: str
    seed: int = Field(0, ge=0)
    photo_id: str | None = None


def read_photo(uri: str, settings: Settings) -> LoadedImage:
    """Read and decode the photo at ``uri`` (same checks as the pipeline's intake)."""
    return load_image(read_input(uri, settings), source=uri, max_pixels=settings.max_pixels)


def run_segment_stage(image_uri: str, output_root: str, prefix: str, params: SegmentParams, segmenter: str,
                      settings: Settings | None = None, review_assets: bool = False) -> dict[str, Any]:
    """Segment the photo at ``image_uri`` and write every instance mask under ``<prefix>/stages/segment/``.

    Args:
        image_uri: the photo.
        output_root: local directory or ``s3://bucket/prefix``.
        prefix: the run's output prefix name (``<stem>-<hash>``).
        params: prompt, boxes (xyxy px), points (px).
        segmenter: resolved backend name (``lite``, ``sam3``), not ``auto``.
        review_assets: also store the review page's click-decoder files (``clickdecoder.publish_review_assets``)
            while the model and the photo's features are at hand.

    Returns:
        The contents of ``segmentation.json``: ``instances`` (index, score, box, area, mask key),
        ``used_text_prompt``, ``messages``, ``backend`` and ``image`` (width, height).
    """
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    image = read_photo(image_uri, s)
    seg = backends.get_segmenter(segmenter, s).segment(image.rgb, params.request())
    instances = []
    for i, inst in enumerate(seg.instances):
        key = f"{prefix}/{SEGMENT_DIR}/mask-{i}.png"
        storage.write_bytes(key, mask_to_png(inst.mask), content_type="image/png")
        instances.append(inst.summary(i) | {"mask": key})
    summary = {
        "image": {"uri": image_uri, "width": image.width, "height": image.height},
        "instances": instances,
        "used_text_prompt": seg.used_text_prompt,
        "messages": list(seg.messages),
        "backend": seg.backend.as_dict(),
    }
    if review_assets:
        summary["review_assets"] = clickdecoder.publish_review_assets(
            backends.get_segmenter(segmenter, s), image.rgb, storage, prefix, s.review_decoder_weights)
    storage.write_bytes(f"{prefix}/{SEGMENT_DIR}/segmentation.json", json.dumps(summary, indent=2).encode(),
                        content_type="application/json")
    return summary


def _backend(info: dict[str, Any]) -> BackendInfo:
    return BackendInfo(name=info["name"], version=info["version"], device=info.get("device", "cpu"),
                       limits=tuple(info.get("limits", ())), weights=info.get("weights", "none"))


def load_segmentation(output_root: str, prefix: str, settings: Settings | None = None) -> Segmentation:
    """Read back what ``run_segment_stage`` wrote (masks at image size, boxes xyxy px, scores)."""
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    summary = json.loads(storage.read_bytes(f"{prefix}/{SEGMENT_DIR}/segmentation.json"))
    size = (summary["image"]["width"], summary["image"]["height"])
    instances = [
        Instance(mask=mask_from_png(storage.read_bytes(inst["mask"]), size=size, source=inst["mask"]),
                 box=tuple(inst["box"]), score=float(inst["score"]))
        for inst in summary["instances"]
    ]
    return Segmentation(instances=instances, backend=_backend(summary["backend"]),
                        used_text_prompt=bool(summary["used_text_prompt"]), messages=list(summary["messages"]))


def run_reconstruct_stage(jobs: Sequence[ReconstructJobParam], output_root: str, reconstructor: str,
                          settings: Settings | None = None) -> list[dict[str, Any]]:
    """Reconstruct a batch of (image, mask) jobs with one model load.

    Photos are read once per distinct URI; backends with ``reconstruct_batch`` (sam3d) also compute the
    point map once per photo. Each job writes ``object.glb``, ``object.ply`` (when made) and, last,
    ``reconstruction.json`` under its ``output`` prefix.

    Returns:
        Per job, the contents of its ``reconstruction.json``: ``outputs`` (name → key), ``pose``,
        ``stats``, ``backend``.

    Raises:
        InputError: an unreadable photo or mask, or a mask that does not match its photo.
    """
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    photos: dict[str, LoadedImage] = {}
    prepared = []
    for job in jobs:
        if job.image not in photos:
            photos[job.image] = read_photo(job.image, s)
        photo = photos[job.image]
        mask = mask_from_png(storage.read_bytes(job.mask), source=job.mask)
        if mask.shape != photo.rgb.shape[:2]:
            raise InputError(f"mask {job.mask} is {mask.shape[::-1]}, photo {job.image} is "
                             f"{photo.rgb.shape[1::-1]} (width, height)")
        prepared.append((job, photo.rgb, mask))
    backend = backends.get_reconstructor(reconstructor, s)
    if hasattr(backend, "reconstruct_batch"):
        from .backends.sam3d_reconstructor import ReconstructJob

        recons = backend.reconstruct_batch(
            [ReconstructJob(rgb, mask, photo_id=job.photo_id or job.image, seed=job.seed)
             for job, rgb, mask in prepared]
        )
    else:
        recons = [backend.reconstruct(rgb, mask, seed=job.seed) for job, rgb, mask in prepared]
    return [write_reconstruction(storage, job.output, recon) for (job, _, _), recon in zip(prepared, recons,
                                                                                            strict=True)]


def mesh_to_glb(mesh: Any, generator: str) -> bytes:
    """Binary glTF of a ``trimesh.Trimesh`` (vertex colours kept); ``generator`` lands in the scene extras."""
    import trimesh

    scene = trimesh.Scene(mesh)
    scene.metadata.update({"generator": "sam3d-pipeline", "reconstructor": generator})
    return trimesh.exchange.gltf.export_glb(scene)


def glb_to_mesh(data: bytes) -> Any:
    """The single mesh in a GLB as a ``trimesh.Trimesh`` (scene graph transforms applied)."""
    import trimesh

    loaded = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    if isinstance(loaded, trimesh.Scene):
        loaded = loaded.to_geometry() if hasattr(loaded, "to_geometry") else loaded.dump(concatenate=True)
    return loaded


def write_reconstruction(storage: Any, output: str, recon: Reconstruction) -> dict[str, Any]:
    """Write one job's mesh, splat and ``reconstruction.json`` (last) under ``output``."""
    outputs = {"object.glb": f"{output}/object.glb"}
    storage.write_bytes(outputs["object.glb"], mesh_to_glb(recon.mesh, recon.backend.key()),
                        content_type="model/gltf-binary")
    if recon.splat_ply is not None:
        outputs["object.ply"] = f"{output}/object.ply"
        storage.write_bytes(outputs["object.ply"], recon.splat_ply, content_type="application/octet-stream")
    summary = {"outputs": outputs, "pose": recon.pose, "stats": recon.stats, "backend": recon.backend.as_dict()}
    storage.write_bytes(f"{output}/reconstruction.json", json.dumps(summary, indent=2).encode(),
                        content_type="application/json")
    return summary


def load_reconstruction(output_root: str, output: str, settings: Settings | None = None) -> Reconstruction:
    """Read back one job's ``reconstruction.json``, mesh and splat."""
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    summary = json.loads(storage.read_bytes(f"{output}/reconstruction.json"))
    mesh = glb_to_mesh(storage.read_bytes(summary["outputs"]["object.glb"]))
    ply = storage.read_bytes(summary["outputs"]["object.ply"]) if "object.ply" in summary["outputs"] else None
    return Reconstruction(mesh=mesh, backend=_backend(summary["backend"]), splat_ply=ply, pose=summary["pose"],
                          stats=summary["stats"])

