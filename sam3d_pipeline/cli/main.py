"""The ``sam3d-pipeline`` command line."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    pass

# Plain click output for usage errors and help: a message holding a long path prints whole, on one line (rich
# panels crop it), and user text is never read as markup.
app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="Photos to 3D assets with SAM 3 and SAM 3D.")


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks and every Prefect console log line (also of failed runs).")] = False,
) -> None:
    """sam3d-pipeline: photos to 3D assets (segment with SAM 3, reconstruct with SAM 3D Objects)."""
    ctx.obj = {"debug": debug}


from sam3d_pipeline.cli.common import (  # noqa: E402
    EXIT_FAILED,
    EXIT_NO_OBJECT,
    EXIT_USAGE,
    check_output_root,
    debug_requested,
    report_failure,
    run_options,
    say,
    say_unexpected,
)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``X0,Y0,X1,Y1`` in pixels → tuple; raises ``typer.BadParameter`` with the offending text."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"box {text!r}: expected four numbers X0,Y0,X1,Y1") from None
    if len(values) != 4:
        raise typer.BadParameter(f"box {text!r}: expected four numbers X0,Y0,X1,Y1, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise typer.BadParameter(f"box {text!r}: coordinates must be finite numbers")
    if not (values[2] > values[0] and values[3] > values[1]):
        raise typer.BadParameter(f"box {text!r}: need X0 < X1 and Y0 < Y1")
    return values  # type: ignore[return-value]


def parse_point(text: str) -> dict:
    """``X,Y[,LABEL]`` (label 1 = object, 0 = background) → dict."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"point {text!r}: expected X,Y or X,Y,LABEL") from None
    if len(values) not in (2, 3):
        raise typer.BadParameter(f"point {text!r}: expected X,Y or X,Y,LABEL")
    if not all(math.isfinite(v) for v in values):
        raise typer.BadParameter(f"point {text!r}: coordinates must be finite numbers")
    label = int(values[2]) if len(values) == 3 else 1
    if label not in (0, 1) or (len(values) == 3 and values[2] not in (0.0, 1.0)):
        raise typer.BadParameter(f"point {text!r}: LABEL must be 1 (object) or 0 (background)")
    return {"x": values[0], "y": values[1], "label": label}


@app.command()
def run(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(
        help="Photo or video (MP4/MOV/WebM, or a folder / s3://…/ prefix of frames): local path or s3:// URI.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to segment, e.g. 'red chair'.")],
    out: Annotated[str | None, typer.Option("--out", help="Output root: directory or s3://bucket/prefix.")] = None,
    box: Annotated[list[str] | None, typer.Option("--box", help="Box prompt X0,Y0,X1,Y1 (pixels).")] = None,
    point: Annotated[
        list[str] | None, typer.Option("--point", help="Click X,Y[,LABEL] (pixels; 1 object, 0 background).")
    ] = None,
    instance: Annotated[int | None, typer.Option("--instance", min=0, help="Instance to reconstruct.")] = None,
    segmenter: Annotated[str, typer.Option("--segmenter", help="auto|lite|sam3")] = "auto",
    reconstructor: Annotated[str, typer.Option("--reconstructor", help="auto|lite|sam3d")] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if a completed result exists.")] = False,
    instances: Annotated[str, typer.Option(
        "--instances", help="Objects to reconstruct: best, all, or instance indices like 0,2.")] = "best",
    profile: Annotated[str, typer.Option("--profile", help="web|ar|raw|store (web: simplified, quantised "
                                                     "GLB; store: textured PBR checked against store rules).")] = "web",
    export: Annotated[str, typer.Option("--export", help="Formats per object: glb,usdz,obj,ply.")] = "glb,usdz",
    video_frames: Annotated[int, typer.Option(
        "--video-frames", min=1, max=8, help="Video: reconstruct from the best tracked frame (1) or the K best.")] = 1,
) -> None:
    """Run image-to-3d on one photo (embedded default: the reused local Prefect API, see `local-api`).

    Exit code 0 completed, 1 failed (one line naming the input and the reason), 2 bad usage (before Prefect
    starts), 3 no object found.
    """
    debug = debug_requested(ctx)
    params = _run_parameters(image=image, prompt=prompt, output_root=out, boxes=box, points=point,
                             instance_index=instance, segmenter=segmenter, reconstructor=reconstructor, seed=seed,
                             force=force, instances=instances, profile=profile, export=export,
                             video_frames=video_frames)
    say("image-to-3d", f"{image} prompt={prompt!r}", style="bold")
    from sam3d_pipeline.settings import local_prefect_defaults

    local_prefect_defaults()
    started = time.perf_counter()
    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline.cli.local import LocalApiDidNotStart, cli_run_settings
    from sam3d_pipeline.run.report import RunResult

    try:
        with cli_run_settings(debug=debug):
            state = image_to_3d(**params, return_state=True)
    except LocalApiDidNotStart as exc:
        say("error:", f"{image}: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except Exception as exc:  # noqa: BLE001 (a bug or an unreachable Prefect API: one line unless --debug)
        if debug:
            raise
        say_unexpected(image, exc)
        raise typer.Exit(EXIT_FAILED) from None
    wall = time.perf_counter() - started
    if not state.is_completed():
        report_failure(state, image, debug)
        raise typer.Exit(EXIT_FAILED)
    result = RunResult.model_validate(state.result())
    _print_result(result, wall)
    if result.status == "no_object":
        raise typer.Exit(EXIT_NO_OBJECT)
    if result.status != "completed":
        raise typer.Exit(EXIT_FAILED)


def _run_parameters(*, image: str, prompt: str, boxes: list[str] | None, points: list[str] | None,
                    segmenter: str, reconstructor: str, instances: str, profile: str, export: str,
                    output_root: str | None, **rest: object) -> dict[str, object]:
    """The flow's parameters from the command's options, checked before Prefect starts (``typer.BadParameter``
    names the option; a missing local input exits 1)."""
    if segmenter not in ("auto", "lite", "sam3"):
        raise typer.BadParameter(f"{segmenter!r}: choose auto, lite or sam3", param_hint="--segmenter")
    if reconstructor not in ("auto", "lite", "sam3d"):
        raise typer.BadParameter(f"{reconstructor!r}: choose auto, lite or sam3d", param_hint="--reconstructor")
    parsed_boxes = [parse_box(b) for b in boxes or []]
    parsed_points = [parse_point(p) for p in points or []]
    from sam3d_pipeline.errors import InputError
    from sam3d_pipeline.export import PROFILES
    from sam3d_pipeline.run.objects import parse_formats, parse_instances

    if profile not in PROFILES:
        raise typer.BadParameter(f"{profile!r}: choose {', '.join(PROFILES)}", param_hint="--profile")
    try:
        instances_spec = parse_instances(instances)
    except InputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--instances") from None
    try:
        formats = parse_formats(export)
    except InputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--export") from None
    run_options(prompt=prompt, boxes=parsed_boxes, points=parsed_points, instance_index=rest["instance_index"],
                segmenter=segmenter, reconstructor=reconstructor, seed=rest["seed"], instances=instances_spec,
                profile=profile, export=formats, video_frames=rest["video_frames"])
    check_output_root(output_root)
    if not image.startswith("s3://") and not os.path.exists(image):
        say("error:", f"{image}: no such file")
        raise typer.Exit(EXIT_FAILED)
    return {"image": image, "prompt": prompt, "output_root": output_root, "boxes": parsed_boxes,
            "points": parsed_points, "segmenter": segmenter, "reconstructor": reconstructor,
            "instances": instances_spec, "profile": profile, "export": formats, **rest}


def _print_result(result: object, wall: float) -> None:
    """Where the outputs are, the one-line summary, and each object's size."""
    from sam3d_pipeline.run.report import summary_line

    print(f"output: {result.output_prefix}")
    print(summary_line(result) + f" (wall {wall:.1f} s)")
    for obj in result.objects:
        exp = obj.get("export", {})
        sizes = ", ".join(f"{name} {n / 1e6:.2f} MB" for name, n in exp.get("bytes", {}).items())
        print(f"object {obj['index']}: {exp.get('triangles', 0):,} triangles ({exp.get('profile')}), {sizes}"
              + ("" if exp.get("budget", {}).get("met", True) else " OVER BUDGET"))


def serve_web(command: str, host: str, port: int, token: str | None) -> None:
    """Serve the web server (studio, job API, review page) until interrupted; ``command`` names it in errors."""
    from urllib.parse import quote

    import uvicorn

    from sam3d_pipeline.review import prefect_api
    from sam3d_pipeline.settings import get_settings
    from sam3d_pipeline.web.app import create_app
    from sam3d_pipeline.web.assets import ensure_browser_packages
    from sam3d_pipeline.web.auth import new_token

    for problem in ensure_browser_packages():  # the viewer and the click decoder runtime, from their lock files
        print(f"warning: {problem}", file=sys.stderr)
    try:  # without a reachable API there are no jobs to show and none can start
        prefect_api.check_api()
    except prefect_api.PrefectUnreachable as exc:
        say("error:", f"{command}: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    settings = get_settings()
    tokens = list(dict.fromkeys(t for t in (token, settings.api_token, os.environ.get("SAM3D_REVIEW_TOKEN")) if t))
    # The token goes in the URL fragment: browsers never send it, so it stays out of access logs and history. A
    # token the caller gave is never printed (this output often lands in a log file); one made up here must be.
    shown = "<your token>"
    if not tokens:
        tokens = [new_token()]
        shown = quote(tokens[0], safe="")
    base = f"http://{host}:{port}"
    print(f"studio:      {base}/#token={shown}", flush=True)
    print(f"review page: {base}/review#token={shown}", flush=True)
    print(f"job API:     {base}/v1/jobs (docs: {base}/docs)", flush=True)
    uvicorn.run(create_app(tokens, settings), host=host, port=port, log_level="warning")


@app.command("web")
def web(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    token: Annotated[
        str | None, typer.Option(envvar="SAM3D_API_TOKEN", help="Access token (default: a new random one).")
    ] = None,
) -> None:
    """Serve the studio, the job API (/v1/jobs, webhooks) and the review page (needs PREFECT_API_URL)."""
    serve_web("web", host, port, token)


@app.command("review-server")
def review_server(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    token: Annotated[
        str | None, typer.Option(envvar="SAM3D_REVIEW_TOKEN", help="Access token (default: a new random one).")
    ] = None,
) -> None:
    """The web server under its former name (the review page is at /review; see `web`)."""
    serve_web("review-server", host, port, token)


@app.command("gpu-worker")
def gpu_worker(
    idle_s: Annotated[float | None, typer.Option(help="Exit after this long idle (default SAM3D_GPU_IDLE_S).")] = None,
    stages: Annotated[str | None, typer.Option(
        help="Stage tasks to serve: segment, reconstruct or all (default SAM3D_GPU_WORKER_STAGES).")] = None,
) -> None:
    """Run one warm GPU worker session here: serve the model stages of flows that use SAM3D_GPU_STAGES=workers
    (needs PREFECT_API_URL of a Prefect server) until idle, then exit."""
    from flows.gpu_worker import gpu_worker as session

    print(f"GPU worker session: {session(idle_s=idle_s, stages=stages)}", flush=True)


@app.command("local-api")
def local_api(
    stop: Annotated[bool, typer.Option("--stop", help="Stop it (a running command loses its API).")] = False,
) -> None:
    """The local Prefect API server that `run` and `catalog` reuse when PREFECT_API_URL is not set: where it
    is, or stop it. It stops by itself after SAM3D_LOCAL_API_IDLE_S seconds idle (default 600)."""
    from sam3d_pipeline.cli import local_api as server

    folder = server.state_dir()
    if stop:
        record = server.stop(folder)
        print(f"stopped the local Prefect API (pid {record.pid})" if record else "no local Prefect API was running")
        return
    record = server.running(folder)
    if record is None:
        print(f"no local Prefect API is running (state: {folder})")
        return
    print(f"local Prefect API: {record.url} (pid {record.pid}, Prefect {record.prefect_version}, "
          f"{len(server.live_clients(folder))} command(s) attached; state: {folder})")


from sam3d_pipeline.cli.stack import down, events_bridge, restart, up  # noqa: E402

app.command("events-bridge")(events_bridge)
app.command("up")(up)
app.command("down")(down)
app.command("restart")(restart)

from sam3d_pipeline.cli.catalog import catalog as _catalog  # noqa: E402

app.command("catalog")(_catalog)

from sam3d_pipeline.cli.sam3 import doctor, export_decoder  # noqa: E402 (subcommands live in their own module)

app.command("doctor")(doctor)
app.command("export-decoder")(export_decoder)


def main() -> None:
    from sam3d_pipeline.cli import local_api

    status = local_api.forward_to_warm(sys.argv[1:])  # `run` / `catalog` forked warm, when the local API is up
    if status is not None:
        sys.exit(status)
    sys.exit(app(prog_name=local_api.warm_prog_name()))


if __name__ == "__main__":
    main()
