"""The GPU boundary: the one place that decides where the model stages run (``SAM3D_GPU_STAGES``).

``inline`` (the embedded default) runs them in this process with the pixels in memory. ``workers`` submits a
``GpuBatch`` (storage keys, never pixels) as the background task of its stage (``gpu-segment``, ``gpu-reconstruct``,
or ``gpu-stage`` for both at once; ``tasks/gpu_tasks.py``) to the warm GPU worker sessions of that stage's
deployment (``flows/gpu_worker.py``: SAM 3 sessions, SAM 3D Objects sessions, or one deployment with both models),
starts sessions when the queue needs them, and waits,
watching the task's lease: a worker lost mid-task (spot interruption, out of memory, SIGKILL) gets its task run
marked Crashed and the batch submitted again, after an out-of-memory loss with the low-memory settings. A
permanent input error raised by the stage is not retried. ``image-to-3d`` (photos and clips: a clip is tracked
as the segment stage), ``catalog-batch`` and the review's re-segment all come through here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.logging import get_logger
from prefect.states import Cancelled, Crashed

from sam3d_pipeline import catalog, video
from sam3d_pipeline.backoff import backoff_s
from sam3d_pipeline.errors import InputNotFoundError, TransientError, error_from_record
from sam3d_pipeline.gpu import stages as gpu_stages
from sam3d_pipeline.gpu.failures import GpuStageError, StageAttempt, classify, next_low_memory, should_retry
from sam3d_pipeline.gpu.stages import GpuBatch, ReconstructJobParam, SegmentJob, SegmentParams, TrackJob
from sam3d_pipeline.gpu.workers import (
    TASK_NAMES,
    Lease,
    lease_key,
    lease_verdict,
    session_heartbeat_key,
    session_lost,
    sessions_to_start,
    stage_deployment,
    task_kind,
)
from sam3d_pipeline.images import LoadedImage, encode_png
from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.masks import mask_to_png
from sam3d_pipeline.run import objects, pipeline
from sam3d_pipeline.run.finish import RunRecord
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import Storage, open_storage
from sam3d_pipeline.types import Reconstruction, Segmentation
from tasks.embeddings import store_review_assets
from tasks.reconstruct import reconstruct_in_process, reconstruct_objects_in_process
from tasks.segment import log_track, segment_in_process, track_in_process

ACTIVE_SESSION_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
SCALE_AFTER_S = 1.0  # a GPU task still queued this long after its submission may need another session


def segment(image: LoadedImage, options: pipeline.RunOptions, run_plan: pipeline.RunPlan, settings: Settings,
            output_root: str, review_assets: bool = False) -> Segmentation:
    """Find the instances ``options`` ask for, where ``SAM3D_GPU_STAGES`` says the segmenter runs.

    ``review_assets`` also stores the review page's click-decoder files, where the model runs.
    """
    if settings.gpu_stages == "inline":
        seg = segment_in_process(image, options, run_plan, settings)
        if review_assets:
            store_review_assets(image, run_plan, settings)
        return seg
    pipeline.segment_request(options, image.width, image.height)  # bad boxes/points fail here, before a GPU
    job = SegmentJob(image=run_plan.input_uri, prefix=run_plan.prefix, review_assets=review_assets,
                     params=SegmentParams(prompt=options.prompt, boxes=options.boxes, points=options.points),
                     score_threshold=settings.score_threshold)
    timing, attempts = _one_job(GpuBatch(output_root=output_root, segmenter=run_plan.segmenter.name,
                                         segment=[job]), "segment", settings)
    seg = gpu_stages.load_segmentation(output_root, run_plan.prefix, settings)
    seg.stage = timing
    seg.messages.extend(f"gpu-stage {a.line()}" for a in attempts if len(attempts) > 1)
    return seg


def track(record: RunRecord, clip: video.LoadedVideo, settings: Settings, output_root: str) -> Segmentation:
    """Track a clip's object (the segment stage of a video), where ``SAM3D_GPU_STAGES`` says the segmenter runs;
    the chosen frame becomes ``record.image`` and its mask ``record.seg`` (``pipeline.start_from_video``).

    On the workers the clip goes by its URI with this process's sampling settings; the worker writes the masks and
    scores of every sampled frame, and the views are scored and chosen here, on the frames this process decoded.
    """
    if settings.gpu_stages == "inline":
        return track_in_process(record, clip, settings)
    options, run_plan = record.options, record.run_plan
    pipeline.segment_request(options, clip.width, clip.height)  # bad boxes/points fail here, before a GPU
    job = TrackJob(video=run_plan.input_uri, sha256=clip.sha256, prefix=run_plan.prefix,
                   params=SegmentParams(prompt=options.prompt, boxes=options.boxes, points=options.points),
                   sampling=video.sampling(settings))
    timing, attempts = _one_job(GpuBatch(output_root=output_root, segmenter=run_plan.segmenter.name, track=[job]),
                                "segment", settings)
    tracked = gpu_stages.load_track(output_root, run_plan.prefix, [f.index for f in clip.frames], settings)
    pipeline.start_from_video(record, pipeline.choose_views(clip, tracked, options.video_frames, timing))
    record.seg.messages.extend(f"gpu-stage {a.line()}" for a in attempts if len(attempts) > 1)
    log_track(record)
    return record.seg


def reconstruct_run(record: RunRecord, settings: Settings, output_root: str) -> None:
    """Reconstruct a run's chosen objects onto ``record``: several together (one point map per photo), or the one
    selected; for a video, the reconstructor may also try the other best views (``pipeline.try_other_views``)."""
    record.objects = objects.choose(record.seg.instances, record.options.instances, record.selected)
    if len(record.objects) > 1:
        record.recons = reconstruct_objects(record.image, record.seg, record.objects, record.options,
                                            record.run_plan, settings, output_root)
        record.recon = record.recons[record.selected]
        return
    record.recon = reconstruct(record.image, record.seg, record.selected, record.options, record.run_plan,
                               settings, output_root)
    pipeline.try_other_views(record, lambda frame, seg: reconstruct(
        frame, seg, 0, record.options, record.run_plan, settings, output_root))


def reconstruct(image: LoadedImage, seg: Segmentation, selected: int, options: pipeline.RunOptions,
                run_plan: pipeline.RunPlan, settings: Settings, output_root: str) -> Reconstruction:
    """Reconstruct the selected instance, where ``SAM3D_GPU_STAGES`` says the reconstructor runs."""
    mask = seg.instances[selected].mask
    if settings.gpu_stages == "inline":
        return reconstruct_in_process(image, mask, options, run_plan, settings)
    # The mask goes to the workers as it is here: a stage mask, a reviewer's edit or a persisted round's.
    keys = RunKeys(run_plan.prefix)
    storage = open_storage(output_root, settings)
    storage.write_bytes(keys.reconstruct_input_mask, mask_to_png(mask), content_type="image/png")
    job = ReconstructJobParam(image=_photo_uri(image, run_plan, storage), mask=keys.reconstruct_input_mask,
                              output=keys.reconstruct_dir, seed=options.seed)
    timing, attempts = _one_job(GpuBatch(output_root=output_root, reconstructor=run_plan.reconstructor.name,
                                         reconstruct=[job]), "reconstruct", settings)
    recon = gpu_stages.load_reconstruction(output_root, job.output, settings)
    recon.stage = timing
    recon.stats["gpu_attempts"] = [a.as_dict() for a in attempts]
    seg.messages.extend(f"gpu-stage {a.line()}" for a in attempts if len(attempts) > 1)
    return recon


def reconstruct_objects(image: LoadedImage, seg: Segmentation, indices: list[int], options: pipeline.RunOptions,
                        run_plan: pipeline.RunPlan, settings: Settings,
                        output_root: str) -> dict[int, Reconstruction]:
    """Reconstruct several instances of one photo together (one task, one point map), where
    ``SAM3D_GPU_STAGES`` says the reconstructor runs."""
    if settings.gpu_stages == "inline":
        return reconstruct_objects_in_process(image, seg, indices, options, run_plan, settings)
    keys = RunKeys(run_plan.prefix)
    storage = open_storage(output_root, settings)
    photo = _photo_uri(image, run_plan, storage)
    jobs = []
    for i in indices:
        storage.write_bytes(keys.object_reconstruct_input_mask(i), mask_to_png(seg.instances[i].mask),
                            content_type="image/png")
        jobs.append(ReconstructJobParam(image=photo, mask=keys.object_reconstruct_input_mask(i),
                                        output=keys.object_reconstruct_dir(i), seed=options.seed,
                                        photo_id=run_plan.input_uri))
    result, attempts = run_on_workers(GpuBatch(output_root=output_root, reconstructor=run_plan.reconstructor.name,
                                               reconstruct=jobs), settings)
    recons = {}
    for i, job, done in zip(indices, jobs, result["reconstruct"], strict=True):
        if "error" in done:
            raise error_from_record(done["error"])
        recon = gpu_stages.load_reconstruction(output_root, job.output, settings)
        recon.stage = result["timing"]["reconstruct"] | {"objects": len(jobs)}
        recon.stats["gpu_attempts"] = [a.as_dict() for a in attempts]
        recons[i] = recon
    seg.messages.extend(f"gpu-stage {a.line()}" for a in attempts if len(attempts) > 1)
    return recons


def _photo_uri(image: LoadedImage, run_plan: pipeline.RunPlan, storage: Storage) -> str:
    """Where a reconstruct worker reads the photo: the run's input, or for a clip its chosen frame, written as a PNG
    under the run's prefix (the frame goes by key, like the mask)."""
    if not video.is_video_uri(run_plan.input_uri):
        return run_plan.input_uri
    return storage.write_bytes(RunKeys(run_plan.prefix).reconstruct_input_image, encode_png(image.rgb),
                               content_type="image/png")


def _one_job(batch: GpuBatch, stage: str, settings: Settings) -> tuple[dict[str, Any], list[StageAttempt]]:
    """Run a one-job batch on the workers; its stage's timing and the attempts, or the job's own error raised."""
    result, attempts = run_on_workers(batch, settings)
    done = result[stage][0]
    if "error" in done:
        raise error_from_record(done["error"])
    return result["timing"][stage], attempts


def catalog_batch(works: list[catalog.ItemWork], batch_index: int, output_root: str,
                  settings: Settings) -> list[catalog.ItemWork]:
    """Segment, select and reconstruct a catalog GPU batch: in this process, or on the workers (one task where one
    deployment serves both stages, else a segment task and then a reconstruct task)."""
    logger = get_run_logger()
    if settings.gpu_stages == "inline":
        works = catalog.segment_batch(works, settings)
        logger.info("GPU batch %d: reconstructing %d item(s)", batch_index,
                    sum(1 for w in works if w.error is None and w.selected is not None))
        return catalog.reconstruct_batch(works, batch_index, settings)
    batch = catalog.gpu_batch_request(works, output_root, settings)
    if batch is None:
        return works
    logger.info("GPU batch %d: %d photo(s) and %d clip(s) to the GPU workers", batch_index, len(batch.segment),
                len(batch.track))
    result, _ = run_on_workers(batch, settings)
    return catalog.apply_gpu_result(works, result, batch_index, output_root, settings)


# ---------------------------------------------------------------------------------------------------------------
# Workers: submit, keep the pool big enough, watch the lease, resubmit what a lost worker dropped


def deployment_of(stage: str, settings: Settings) -> str:
    """The worker deployment that serves ``stage`` (``segment``, ``reconstruct``, or ``all``)."""
    return stage_deployment(stage, worker_deployment=settings.gpu_worker_deployment,
                            segment_deployment=settings.gpu_segment_deployment,
                            reconstruct_deployment=settings.gpu_reconstruct_deployment)


def _one_deployment(settings: Settings) -> bool:
    return deployment_of("segment", settings) == deployment_of("reconstruct", settings)


def run_on_workers(batch: GpuBatch, settings: Settings, *,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[dict[str, Any], list[StageAttempt]]:
    """Run ``batch`` on the GPU workers of its stage and wait for its result.

    A batch of one stage goes as that stage's task to that stage's deployment. A batch with both (a catalog batch)
    goes as one ``gpu-stage`` task where one deployment serves both stages; otherwise as a ``gpu-segment`` task, then
    a ``gpu-reconstruct`` task built from its result (``gpu_stages.reconstruct_part``), the two results merged into
    the one result shape.

    Returns:
        The batch's result (``timing[stage]`` completed with ``queue_wait_s``) and every attempt.

    Raises:
        PipelineError: the stage failed permanently (the stage's own error, e.g. ``InputError``).
        GpuStageError: workers were lost more often than ``SAM3D_GPU_STAGE_ATTEMPTS``, or no result came within
            ``SAM3D_GPU_STAGE_TIMEOUT_S``.
    """
    batch = gpu_stages.declared_identity(batch, settings)  # the worker refuses it if it runs other weights
    stages = gpu_stages.batch_stages(batch)
    kind = task_kind(stages, same_deployment=_one_deployment(settings)) if stages else "all"
    if kind is not None:
        return _run_task(batch, kind, settings, sleep)
    segmented, attempts = _run_task(gpu_stages.segment_part(batch), "segment", settings, sleep)
    rest = gpu_stages.reconstruct_part(batch, segmented)
    reconstructed = None
    if rest is not None:
        _logger().info("GPU batch: %d object(s) of %d photo(s) and clip(s) to the reconstruct workers",
                       len(rest.reconstruct), len(batch.segment) + len(batch.track))
        reconstructed, more = _run_task(rest, "reconstruct", settings, sleep)
        attempts = attempts + more
    return gpu_stages.merge_results(segmented, reconstructed), attempts


def _run_task(batch: GpuBatch, kind: str, settings: Settings,
              sleep: Callable[[float], None]) -> tuple[dict[str, Any], list[StageAttempt]]:
    """Submit ``batch`` as the task of ``kind`` until it completes, resubmitting after a lost worker."""
    from tasks.gpu_tasks import GPU_TASKS

    gpu_task, name = GPU_TASKS[kind], TASK_NAMES[kind]
    logger = get_run_logger()
    storage = open_storage(batch.output_root, settings)
    attempts: list[StageAttempt] = []
    low_memory = bool(batch.low_memory)
    for n in range(1, settings.gpu_stage_attempts + 1):
        this = batch.model_copy(update={"low_memory": True}) if low_memory else batch
        while True:
            submitted, submission = time.time(), uuid.uuid4().hex
            future = gpu_task.delay(this, submission)
            run_id = str(future.task_run_id)
            outcome, message = _wait(future, run_id, storage, settings, kind)
            # A flow run re-executed after a suspension (a long review) counts its task calls from 0 again, and
            # Prefect answers a repeated call with that call's earlier run: another batch's finished run. Submit
            # again (each call gets the next key) until the run is this submission's (a worker that does not
            # echo the submission is taken at its word).
            if outcome != "ok" or future.result().get("submission", submission) == submission:
                break
            logger.info("%s: task run %s answered an earlier submission; submitting again", name, run_id)
        attempt = StageAttempt(attempt=n, flow_run_id=run_id, state="COMPLETED" if outcome == "ok" else "CRASHED",
                               kind=outcome, message=message[:500], low_memory=low_memory)
        attempts.append(attempt)
        if outcome == "ok":
            result = future.result()
            for timing in result["timing"].values():
                timing["queue_wait_s"] = round(max(0.0, timing.pop("started_at", submitted) - submitted), 3)
            if n > 1:
                _record(attempts)
            return result, attempts
        if outcome == "failed":  # the stage raised a permanent error: raise it as it is
            future.result(raise_on_failure=True)
        logger.warning("%s %s", name, attempt.line())
        if not should_retry(outcome, n, settings.gpu_stage_attempts, low_memory):
            _record(attempts)
            raise GpuStageError(f"{name} did not complete: {attempt.line()}", attempts)
        low_memory = next_low_memory(outcome, low_memory)
        delay = backoff_s(n, settings.gpu_stage_retry_delay_s)
        logger.info("submitting again in %.1f s%s", delay, " with low-memory settings" if low_memory else "")
        sleep(delay)
    raise GpuStageError(f"{name} did not complete", attempts)  # not reached: should_retry stops the loop


def _wait(future: Any, run_id: str, storage: Storage, settings: Settings, kind: str) -> tuple[str, str]:
    """Wait for the task run to end, or its worker to be lost. Returns ``(kind, message)``."""
    deadline = time.monotonic() + settings.gpu_stage_timeout_s
    queued_until = time.monotonic() + settings.gpu_lease_s
    # A free session takes the task within tenths of a second: scale only for a task still queued after
    # SCALE_AFTER_S (counting the queue and the sessions is ~0.25 s of API calls on the stage's critical path).
    last_scaled = time.monotonic() + SCALE_AFTER_S - max(2.0, settings.gpu_poll_s)
    undelivered, looks = 0, 0
    with get_client(sync_client=True) as client:
        while True:
            # The state can read as None for a moment (the server records task run states from events).
            state = client.read_task_run(run_id).state
            if state is not None and state.is_final():
                if state.is_completed():
                    return "ok", ""
                return classify(state.type.value, state.message), state.message or ""
            try:
                lease = read_lease(storage, run_id)
            except TransientError as exc:  # storage unreachable: no verdict now (lost only when seen stale)
                get_logger("gpu_dispatch").warning("lease of GPU task %s unreadable (%s); looking again", run_id, exc)
                lease, ended, why, verdict = None, False, "", "unknown"
            else:
                ended, why = _session_ended(client, lease.session) if lease else (False, "")
                verdict = lease_verdict(lease, now=time.time(), lease_s=settings.gpu_lease_s, session_ended=ended)
            if verdict == "lost":
                message = why or (f"worker session {lease.session} stopped renewing its lease "
                                  f"(>{settings.gpu_lease_s:g} s)")
                client.set_task_run_state(run_id, Crashed(message=f"GPU worker lost: {message}"), force=True)
                storage.delete(lease_key(run_id))
                return classify("CRASHED", message), message
            if verdict == "queued" and time.monotonic() - last_scaled >= max(2.0, settings.gpu_poll_s):
                ensure_sessions(client, settings, stage=kind)
                last_scaled = time.monotonic()
            # A session waiting for work takes a queued task within a second: one that stays free at two looks
            # while this task sits Scheduled means the server no longer queues it (a restarted Prefect server
            # forgets its in-memory task queue, the task run stays Scheduled for good).
            waiting = (verdict == "queued" and state is not None and state.type == StateType.SCHEDULED
                       and time.monotonic() > queued_until and _free_session_waiting(client, kind))
            undelivered = undelivered + 1 if waiting else 0
            if undelivered >= 2:
                message = "never delivered to the waiting GPU worker sessions (the Prefect server lost its queue)"
                client.set_task_run_state(run_id, Crashed(message=message), force=True)
                return "crashed", message
            if time.monotonic() > deadline:
                message = f"no result within SAM3D_GPU_STAGE_TIMEOUT_S={settings.gpu_stage_timeout_s:g}"
                client.set_task_run_state(run_id, Crashed(message=message), force=True)
                return "timeout", message
            # Look again soon at first, then every gpu_poll_s: a warm stage often ends within a second, and the
            # end event can come before the waiter has subscribed to it (then only the next look sees it).
            look_again_s = min(settings.gpu_poll_s, 0.1 * 2 ** looks)
            looks += 1
            try:
                future.wait(timeout=look_again_s)  # returns at once when the run ends (an event)
            except RuntimeError:  # its state is not recorded yet: usually a matter of milliseconds
                time.sleep(look_again_s)


def _free_session_waiting(client: SyncPrefectClient, kind: str) -> bool:
    """Whether a GPU worker session is subscribed for the task of ``kind`` right now (it subscribes only when free)."""
    from tasks.gpu_tasks import GPU_TASKS

    response = client.request("POST", "/task_workers/filter",
                              json={"task_worker_filter": {"task_keys": [GPU_TASKS[kind].task_key]}})
    return response.status_code == 200 and bool(response.json())


def read_lease(storage: Storage, task_run_id: str) -> Lease | None:
    try:
        return Lease.model_validate_json(storage.read_bytes(lease_key(task_run_id)))
    except (InputNotFoundError, ValueError):
        return None


def _session_ended(client: SyncPrefectClient, session: str) -> tuple[bool, str]:
    """Whether a worker session (a flow run id) has a final state, and that state's message."""
    try:
        run = client.read_flow_run(uuid.UUID(session))
    except (ValueError, ObjectNotFound):  # a session started by hand has no flow run: only its heartbeat counts
        return False, ""
    if run.state is None or not run.state.is_final():
        return False, ""
    return True, f"worker session {session} ended {run.state.type.value}: {run.state.message or ''}".strip()


_NO_DEPLOYMENT_LOGGED: set[str] = set()


def ensure_sessions(client: SyncPrefectClient, settings: Settings, queued: int | None = None,
                    stage: str = "all") -> int:
    """Start GPU worker sessions of the deployment serving ``stage`` (``SAM3D_GPU_SEGMENT_DEPLOYMENT``,
    ``SAM3D_GPU_RECONSTRUCT_DEPLOYMENT``; both default to ``SAM3D_GPU_WORKER_DEPLOYMENT``) while queued work of that
    deployment needs them.

    Two flows that start sessions at the same moment may both start one: each then keeps its new session only
    while it is within ``SAM3D_GPU_MAX_WORKERS`` by creation time, and deletes it otherwise (not yet started).
    ``queued`` is the number of that deployment's GPU tasks waiting (default: counted from the API). Returns how
    many sessions this call kept.
    """
    name = deployment_of(stage, settings)
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        if name not in _NO_DEPLOYMENT_LOGGED:
            _NO_DEPLOYMENT_LOGGED.add(name)
            _logger().warning("no %r deployment: GPU work waits for a worker started by hand "
                                     "(sam3d-pipeline gpu-worker)", name)
        return 0
    if queued is None:
        kinds = list(TASK_NAMES) if _one_deployment(settings) else [stage]
        queued = sum(len(client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_=TASK_NAMES[k]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.SCHEDULED]))),
            limit=settings.gpu_max_workers)) for k in kinds)
    active = _active_sessions(client, deployment.id, settings)
    wanted = sessions_to_start(queued=queued, active=len(active), max_workers=settings.gpu_max_workers)
    kept = 0
    for _ in range(wanted):
        run = client.create_flow_run_from_deployment(deployment.id, tags=["sam3d-gpu-session"])
        order = [r.id for r in _active_sessions(client, deployment.id, settings)]
        if run.id in order and order.index(run.id) >= settings.gpu_max_workers:
            client.set_flow_run_state(run.id, Cancelled(message="surplus GPU worker session: another flow started "
                                                        "one at the same moment"), force=True)
            break
        kept += 1
    if kept:
        _logger().info("started %d GPU worker session(s) (%d queued task(s), %d session(s) active)", kept,
                              queued, len(active))
    return kept


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run
        return get_logger("sam3d.gpu_dispatch")


def _active_sessions(client: SyncPrefectClient, deployment_id: Any, settings: Settings | None = None) -> Sequence[Any]:
    """Sessions starting or running, in the order the server created them (every caller sees the same first N;
    a client-side timestamp such as the expected start time would not give that order).

    With ``settings``, a Running session whose heartbeat went stale (killed: its flow run would say Running
    forever) is marked Crashed and left out, so it no longer holds a place within ``SAM3D_GPU_MAX_WORKERS``.
    """
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_SESSION_STATES))),
    )
    if settings is not None:
        runs = [r for r in runs if not _lost_session(client, r, settings)]
    return sorted(runs, key=lambda r: (r.created, str(r.id)))


def _lost_session(client: SyncPrefectClient, run: Any, settings: Settings) -> bool:
    """True (and the run marked Crashed) when a Running session's heartbeat is older than ``SAM3D_GPU_LEASE_S``."""
    if run.state is None or run.state.type != StateType.RUNNING:
        return False
    storage = open_storage(settings.output_root, settings)
    try:
        beat = Lease.model_validate_json(storage.read_bytes(session_heartbeat_key(str(run.id))))
    except (InputNotFoundError, ValueError):
        return False
    if not session_lost(beat, now=time.time(), lease_s=settings.gpu_lease_s):
        return False
    age = time.time() - beat.heartbeat_at
    client.set_flow_run_state(run.id, Crashed(message=f"GPU worker session lost: no heartbeat for {age:.0f} s "
                                              f"(> SAM3D_GPU_LEASE_S={settings.gpu_lease_s:g})"), force=True)
    storage.delete(session_heartbeat_key(str(run.id)))
    _logger().warning("GPU worker session %s lost (no heartbeat for %.0f s): marked Crashed", run.id, age)
    return True


def _record(attempts: list[StageAttempt]) -> None:
    create_table_artifact(table=[a.as_dict() for a in attempts],
                          description="GPU stage: attempts (state, failure class, message)")
