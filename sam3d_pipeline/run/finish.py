"""The end of a run, written once: render the outputs, build ``result.json``, publish (files first, the result
last), or record a failure. ``image-to-3d``, the plain loop (``pipeline.run_plain``) and every catalog item end
here, so a prefix holds the same files whoever produced it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sam3d_pipeline.errors import PipelineError, error_record
from sam3d_pipeline.export.preview import render_preview
from sam3d_pipeline.images import LoadedImage, encode_png
from sam3d_pipeline.keys import FRAME_FILE, SCENE_FILE, TRACK_FILE, RunKeys, content_type, object_file
from sam3d_pipeline.masks import mask_to_png, overlay
from sam3d_pipeline.run import clock
from sam3d_pipeline.run.objects import ObjectsExport, export_objects
from sam3d_pipeline.run.report import RunResult
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import Storage
from sam3d_pipeline.types import Reconstruction, Segmentation

if TYPE_CHECKING:  # pipeline.run_plain ends through this module
    from sam3d_pipeline.run.pipeline import RunOptions, RunPlan
    from sam3d_pipeline.video.views import VideoRun


@dataclass
class RunRecord:
    """What a run knows when it ends: what it was asked, what it found, and how long each step took.

    Attributes:
        input_uri: the photo as given.
        options: the run's options (after any re-prompt by a reviewer).
        run_plan: backends and output prefix; None when the input could not even be read.
        image: the decoded photo, when it decoded.
        seg: the segmentation, when it ran; ``selected`` the instance reconstructed (None: nothing found).
        recon: the reconstruction (of the selected instance), when it ran.
        objects: every instance index that becomes an object (``instances``), the selected one first;
            ``recons`` their reconstructions when there are several; ``exported`` their files and reports.
        review: the review record (``result.json``'s ``review``); None: not reviewed.
        rejected: a reviewer rejected the mask.
        timings: seconds per step; ``total`` is added when the run ends.
        total_from_steps: ``total`` is the sum of the steps (catalog items share batches) instead of wall time.
        messages: extra lines for ``result.json`` (e.g. which catalog row this was).
    """

    input_uri: str
    options: RunOptions
    run_plan: RunPlan | None = None
    image: LoadedImage | None = None
    seg: Segmentation | None = None
    selected: int | None = None
    recon: Reconstruction | None = None
    review: dict[str, Any] | None = None
    rejected: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    total_from_steps: bool = False
    flow_run_id: str | None = None
    messages: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    objects: list[int] = field(default_factory=list)
    recons: dict[int, Reconstruction] = field(default_factory=dict)
    exported: ObjectsExport | None = None
    video: VideoRun | None = None  # the clip's track and chosen view, when the input is a video
    flow_started_at: float = field(default_factory=time.time)  # epoch: the flow body's start (run/clock.py)
    queued_at: float | None = None  # epoch: when a queued job was due; None: created by this process

    def reconstructions(self) -> dict[int, Reconstruction]:
        """Every reconstructed object by instance index (a one-object run: the selected instance)."""
        if self.recons:
            return self.recons
        return {self.selected: self.recon} if self.recon is not None and self.selected is not None else {}

    @property
    def status(self) -> Literal["completed", "no_object", "rejected"]:
        if self.rejected:
            return "rejected"
        return "completed" if self.recon is not None else "no_object"

    def close_timings(self) -> None:
        steps = sum(v for k, v in self.timings.items()
                    if k not in ("total", "publish", "review_wait", *clock.RENDER_PARTS))
        self.timings["total"] = steps if self.total_from_steps else time.perf_counter() - self.started


@contextmanager
def timed(record: RunRecord, step: str) -> Iterator[None]:
    """Add the seconds the block takes to ``record.timings[step]`` (also when it raises)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        record.timings[step] = record.timings.get(step, 0.0) + time.perf_counter() - t


def backend_label(info: dict[str, Any]) -> str:
    weights = "" if info.get("weights") in (None, "none", "checkpoint") else f", {info['weights']}"
    return f"{info['name']} {info['version']}{weights}"


def ran(planned: dict[str, Any], part: Any) -> dict[str, Any]:
    """A backend as planned, overlaid with what the process that ran the stage reported (``part.backend``)."""
    return dict(planned) | (part.backend.as_dict() if part is not None else {})


EARLY_FILES = ("object.glb",)  # what a viewer waits for: written as soon as it is encoded (``finish_run``)


def render_outputs(record: RunRecord, settings: Settings | None = None,
                   early: Callable[[dict[str, bytes]], None] | None = None) -> dict[str, bytes]:
    """Encode every output file except ``result.json``, in memory: overlay, mask, preview, every object's assets
    (``objects/<i>/``), ``scene.glb``, the selected object's ``object.glb`` and splat at the root.

    ``early`` is handed the ``EARLY_FILES`` as soon as they are encoded: the selected object's GLB before its
    slower formats, the other objects, the preview and the rest.
    """
    s = settings or get_settings()
    image, seg, run_plan, recon = record.image, record.seg, record.run_plan, record.recon
    mask = seg.instances[record.selected].mask if seg is not None and record.selected is not None else None
    seg_label = f"segmenter: {backend_label(ran(run_plan.segmenter_info, seg))}"
    files = {"overlay.png": encode_png(overlay(image.rgb, mask, label=seg_label))}
    if mask is not None:
        files["mask.png"] = mask_to_png(mask)
    if recon is not None:
        handed: list[str] = []

        def early_glb(glb: dict[str, bytes]) -> None:
            handed.extend(glb)
            early(glb)

        with timed(record, "export"):
            record.exported = export_objects(
                seg.instances, record.reconstructions(), record.selected, (image.width, image.height),
                profile=record.options.profile, formats=record.options.export, settings=s,
                extras={"segmenter": f"{run_plan.segmenter_info.get('name')}@{run_plan.segmenter_info.get('version')}",
                        "reconstructor": recon.backend.key()}, early=early_glb if early is not None else None)
        files.update(record.exported.files)  # objects/<i>/..., scene.glb and the selected object's object.glb
        if early is not None and not handed:  # no GLB among the formats: the root one was made at the end
            early({name: files[name] for name in EARLY_FILES if name in files})
        label = f"reconstructor: {backend_label(ran(run_plan.reconstructor_info, recon))}"
        with timed(record, "preview"):
            files["preview.png"] = encode_png(render_preview(recon.mesh, size_px=s.preview_size_px, label=label))
        if recon.splat_ply is not None:
            files["object.ply"] = recon.splat_ply
    if record.video is not None:
        from sam3d_pipeline.video.outputs import frame_png, track_webp

        files[FRAME_FILE] = frame_png(record.video)
        files[TRACK_FILE] = track_webp(record.video)
    return files


def build_result(record: RunRecord, status: str, error: BaseException | None = None) -> RunResult:
    """The report for any outcome (completed, no_object, rejected, failed)."""
    seg, run_plan, recon = record.seg, record.run_plan, record.recon
    messages = list(seg.messages) if seg else []
    if run_plan:
        messages[:0] = [run_plan.segmenter.reason, run_plan.reconstructor.reason]
    if record.image is not None:
        messages += record.image.notes
    messages += record.messages
    # What really ran, as the process that ran each stage reported it (a GPU worker: its device, weights, checkpoint
    # sha256 and dtype), over what the plan knew; the plan adds why the backend was chosen.
    segmenter = ran(run_plan.segmenter_info, seg) if run_plan else None
    reconstructor = ran(run_plan.reconstructor_info, recon) if run_plan else None
    stages = {name: part.stage for name, part in (("segment", seg), ("reconstruct", recon)) if part and part.stage}
    devices = {"segment": (segmenter or {}).get("device", "cpu"),
               "reconstruct": (reconstructor or {}).get("device", "cpu")}
    return RunResult(
        status=status,
        input=record.image.describe() if record.image else {"uri": record.input_uri},
        prompt=record.options.prompt,
        prompt_used_by_segmenter=bool(seg.used_text_prompt) if seg else False,
        segmenter=segmenter,
        reconstructor=reconstructor,
        instances=[inst.summary(i) for i, inst in enumerate(seg.instances)] if seg else [],
        selected=record.selected,
        selection=record.options.selection(),
        review=record.review or {"mode": "none"},
        mesh=recon.stats if recon else None,
        pose=recon.pose if recon else None,
        objects=record.exported.objects if record.exported else [],
        scene=record.exported.scene if record.exported else None,
        export=record.exported.export if record.exported else record.options.export_options(),
        video=record.video.section() if record.video is not None else None,
        stages=stages,
        timings_s={k: round(v, 3) for k, v in record.timings.items()},
        clock=clock.section(timings=record.timings, stages=stages, devices=devices,
                            flow_started_at=record.flow_started_at, queued_at=record.queued_at,
                            price_per_hour=get_settings().gpu_price_per_hour),
        flow_run_id=record.flow_run_id,
        output_prefix=f"{run_plan.output_root.rstrip('/')}/{run_plan.prefix}" if run_plan else "",
        messages=messages,
        error=error_record(error) if error else None,
    )


def publish(storage: Storage, prefix: str, files: dict[str, bytes], result: RunResult,
            written: dict[str, str] | None = None) -> RunResult:
    """Write the files, then ``result.json`` last, so a prefix with a result is complete.

    An earlier ``result.json`` at the same prefix is removed first, so readers never pair a new file with an old
    report. ``written``: files already written (name → URI, by ``write_early``). Returns the result with
    ``outputs`` filled in.
    """
    keys = RunKeys(prefix)
    t = time.perf_counter()
    storage.delete(keys.result)
    outputs = dict(written or {})
    for name in sorted(files):
        if name not in outputs:
            outputs[name] = storage.write_bytes(keys.file(name), files[name], content_type=content_type(name))
    if result.clock:  # the files' writing; result.json itself comes after
        published = round(time.perf_counter() - t, 3)
        result.clock["steps_s"]["publish"] = published
        result.clock["wall_s"] = round(result.clock["wall_s"] + published, 3)
    outputs["result.json"] = storage.uri(keys.result)
    objects = [obj | {"outputs": {name.rsplit("/", 1)[-1]: uri for name, uri in outputs.items()
                                  if name.startswith(object_file(obj["index"], ""))}} for obj in result.objects]
    scene = result.scene | {"outputs": {SCENE_FILE: outputs[SCENE_FILE]}} if SCENE_FILE in outputs else result.scene
    result = result.model_copy(update={"outputs": outputs, "objects": objects, "scene": scene})
    storage.write_bytes(keys.result, result_json(result), content_type="application/json")
    return result


def result_json(result: RunResult) -> bytes:
    return json.dumps(result.model_dump(mode="json"), indent=2).encode()


def existing_result(storage: Storage, prefix: str, statuses: tuple[str, ...] = ("completed",)) -> RunResult | None:
    """The result already at ``prefix`` when its status is one of ``statuses`` (a re-run then reuses it).

    A missing, unreadable or other-status result (e.g. ``failed``) returns None: the work must run.
    """
    key = RunKeys(prefix).result
    if not storage.exists(key):
        return None
    try:
        result = RunResult.model_validate_json(storage.read_bytes(key))
    except ValueError:
        return None
    return result if result.status in statuses else None


def write_early(storage: Storage, prefix: str, written: dict[str, str]) -> Callable[[dict[str, bytes]], None]:
    """``render_outputs``'s ``early``: write those files at once (after removing an earlier ``result.json``, so
    no reader pairs them with an old report) and note their URIs in ``written``."""
    keys = RunKeys(prefix)

    def write(files: dict[str, bytes]) -> None:
        storage.delete(keys.result)
        for name, data in files.items():
            written[name] = storage.write_bytes(keys.file(name), data, content_type=content_type(name))

    return write


def finish_run(storage: Storage, record: RunRecord, settings: Settings | None = None) -> RunResult:
    """Render, build the result and publish it (``result.json`` last; the viewer's GLB as soon as it is
    exported). Returns the published result."""
    t = time.perf_counter()
    written: dict[str, str] = {}
    files = render_outputs(record, settings, early=write_early(storage, record.run_plan.prefix, written))
    record.timings["render"] = time.perf_counter() - t
    record.close_timings()
    t = time.perf_counter()
    result = publish(storage, record.run_plan.prefix, files, build_result(record, record.status), written)
    result.timings_s["publish"] = round(time.perf_counter() - t, 3)
    return result


def fail_run(storage: Storage | None, record: RunRecord, exc: BaseException) -> RunResult:
    """Record a failure: a ``failed`` ``result.json`` at the prefix when it is known (so the next run retries it).

    Returns the failed result; when even that write fails, the result says so in ``messages``.
    """
    if not record.timings.get("total"):
        record.close_timings()
    result = build_result(record, "failed", error=exc)
    if storage is not None and record.run_plan is not None:
        try:
            result = publish(storage, record.run_plan.prefix, {}, result)
        except PipelineError as write_exc:
            result.messages.append(f"could not write the failed result.json: {write_exc}")
    return result
