"""``result.json``: the report written last under each output prefix, and its markdown summary."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from sam3d_pipeline import __version__

Status = Literal["completed", "failed", "no_object", "rejected"]


class RunResult(BaseModel):
    """The contract of ``result.json`` (DESIGN.md, Outputs)."""

    status: Status
    input: dict[str, Any] = Field(description="uri, sha256, width, height, format, original_mode, exif_transposed")
    prompt: str
    prompt_used_by_segmenter: bool = Field(
        description="False when the segmenter cannot read text (lite): the prompt was recorded, not used"
    )
    segmenter: dict[str, Any] | None = Field(description="name, version, device, weights, limits, chosen_because")
    reconstructor: dict[str, Any] | None
    instances: list[dict[str, Any]] = Field(default_factory=list, description="index, score, box (xyxy px), area (px)")
    selected: int | None = None
    selection: dict[str, Any] = Field(default_factory=dict, description="boxes, points, instance_index as requested")
    review: dict[str, Any] | None = None
    outputs: dict[str, str] = Field(default_factory=dict, description="file name → URI")
    mesh: dict[str, Any] | None = None
    pose: dict[str, Any] | None = None
    objects: list[dict[str, Any]] = Field(
        default_factory=list,
        description="one per reconstructed object (instances: best / all / indices), the selected one first: index, "
        "score, box, area, selected, outputs (file name → URI under objects/<index>/), pose, units (m), "
        "scale_source (sam3d-pose | default), size_m, mesh (reconstructor's stats), export (profile, triangles_in, "
        "triangles, bytes per file, budget met / reasons, texture (source, side, charts, vertices, in), usdz_check, "
        "checks (per rule: rule, limit, value, pass, by), checks_passed, export_s)",
    )
    scene: dict[str, Any] | None = Field(
        None, description="scene.glb: layout (reconstructor-pose | image-positions), note, objects, positions_m, "
        "triangles, bytes, outputs")
    export: dict[str, Any] = Field(default_factory=dict, description="profile, formats, max_triangles, max_bytes")
    video: dict[str, Any] | None = Field(
        None, description="when the input is a video: format, codec, width, height, fps, duration_s, frames_read, "
        "frames_sampled, stride, frames_tracked, found_at_index, tracker, chosen (index, time_s, view_score, "
        "chosen_by: view_score | reconstructor_score | reviewer), "
        "candidates and frames (per sampled frame: index, time_s, score, area, border, touches_border, sharpness, "
        "view_score)")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per model stage (segment, reconstruct): worker (session id, or inline), model_load_s "
        "(0.0 when the model was already in memory), queue_wait_s, run_s",
    )
    timings_s: dict[str, float] = Field(default_factory=dict)
    clock: dict[str, Any] | None = Field(
        None, description="where the job's time went (run/clock.py): queue_s, process_start_s, prefect_s, steps_s, "
        "render_s (preview, export), model (per stage: worker, queue_wait_s, model_load_s, run_s, dispatch_s), "
        "orchestration_s, wall_s, gpu_s, and gpu_price_per_hour / gpu_cost when SAM3D_GPU_PRICE_PER_HOUR is set")
    flow_run_id: str | None = None
    output_prefix: str
    messages: list[str] = Field(default_factory=list)
    error: dict[str, str] | None = None
    pipeline_version: str = __version__
    finished_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def summary_line(result: RunResult) -> str:
    """One line for the terminal: status, what was found, what was built, who built it, how long."""
    seg = result.segmenter["name"] if result.segmenter else "?"
    rec = result.reconstructor["name"] if result.reconstructor else "?"
    total = result.timings_s.get("total", 0.0)
    if result.status == "completed":
        inst = result.instances[result.selected] if result.selected is not None else {}
        mesh = result.mesh or {}
        return (
            f"completed: {len(result.instances)} instance(s), selected #{result.selected} "
            f"(score {inst.get('score', 0):.2f}, {inst.get('area', 0):,} px); mesh {mesh.get('vertices', 0):,} "
            f"vertices / {mesh.get('faces', 0):,} faces; segmenter={seg} reconstructor={rec}; {total:.1f} s"
        )
    if result.status == "no_object":
        return f"no_object: nothing found for prompt {result.prompt!r} (segmenter={seg}); {total:.1f} s"
    reason = (result.error or {}).get("message", "")
    return f"{result.status}: {reason}"


def summary_markdown(result: RunResult) -> str:
    """Markdown for the run's summary artifact: status, backends and their limits, links to every output."""
    lines = [f"## image-to-3d: {result.status}", "", f"- input: `{result.input.get('uri')}`",
             f"- prompt: `{result.prompt}`" + ("" if result.prompt_used_by_segmenter else
                                                " (recorded; this segmenter cannot read text)"),
             f"- output prefix: `{result.output_prefix}`"]
    for role in ("segmenter", "reconstructor"):
        info = getattr(result, role)
        if info:
            lines.append(f"- {role}: **{info['name']}** {info['version']} on {info['device']}"
                         f" (weights: {info['weights']})")
            lines.extend(f"  - limit: {limit}" for limit in info.get("limits", []))
    if result.error:
        lines.append(f"- error: **{result.error['type']}**: {result.error['message']}")
    lines.extend(f"- {m}" for m in result.messages)
    if result.outputs:
        lines += ["", "| output | location |", "|---|---|"]
        lines += [f"| {name} | [{uri}]({uri}) |" for name, uri in result.outputs.items()]
    if result.clock:
        from sam3d_pipeline.run.clock import table

        lines += ["", "| where the time went | s |", "|---|---|"]
        lines += [f"| {part} | {seconds:.3f} |" for part, seconds in table(result.clock)]
        lines.append(f"| **wall** | {result.clock['wall_s']:.3f} |")
        gpu = f"GPU-seconds held: {result.clock['gpu_s']:.3f}"
        if "gpu_cost" in result.clock:
            gpu += f" (${result.clock['gpu_cost']:.4f} at ${result.clock['gpu_price_per_hour']}/GPU-hour)"
        lines += ["", gpu]
    elif result.timings_s:
        lines += ["", "timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings_s.items())]
    return "\n".join(lines)
