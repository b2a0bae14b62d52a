"""The ``sam3d-pipeline`` command line."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Photos to 3D assets with SAM 3 and SAM 3D.")

@app.callback()
def _root() -> None:
    """sam3d-pipeline: photos to 3D assets (segment with SAM 3, reconstruct with SAM 3D Objects)."""


EXIT_FAILED = 1
EXIT_NO_OBJECT = 3


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``X0,Y0,X1,Y1`` in pixels → tuple; raises ``typer.BadParameter`` with the offending text."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"box {text!r}: expected four numbers X0,Y0,X1,Y1") from None
    if len(values) != 4:
        raise typer.BadParameter(f"box {text!r}: expected four numbers X0,Y0,X1,Y1, got {len(values)}")
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
    label = int(values[2]) if len(values) == 3 else 1
    if label not in (0, 1) or (len(values) == 3 and values[2] not in (0.0, 1.0)):
        raise typer.BadParameter(f"point {text!r}: LABEL must be 1 (object) or 0 (background)")
    return {"x": values[0], "y": values[1], "label": label}


@app.command()
def run(
    image: Annotated[str, typer.Argument(help="Photo: local path or s3://bucket/key.")],
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
) -> None:
    """Run image-to-3d on one photo (embedded default: in-process, Prefect's ephemeral API)."""
    from rich.console import Console

    console = Console(stderr=True)
    if segmenter not in ("auto", "lite", "sam3"):
        raise typer.BadParameter(f"{segmenter!r}: choose auto, lite or sam3", param_hint="--segmenter")
    if reconstructor not in ("auto", "lite", "sam3d"):
        raise typer.BadParameter(f"{reconstructor!r}: choose auto, lite or sam3d", param_hint="--reconstructor")
    boxes = [parse_box(b) for b in box or []]
    points = [parse_point(p) for p in point or []]
    if not image.startswith("s3://") and not os.path.exists(image):
        console.print(f"[red]error:[/red] {image}: no such file", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)

    console.print(f"[bold]image-to-3d[/bold] {image} prompt={prompt!r} (starting Prefect…)", soft_wrap=True)
    from sam3d_pipeline.settings import local_prefect_defaults

    local_prefect_defaults()
    started = time.perf_counter()
    from flows.image_to_3d import image_to_3d
    from flows.local import LocalApiDidNotStart, cli_run_settings
    from sam3d_pipeline.report import RunResult, summary_line

    try:
        with cli_run_settings():
            state = image_to_3d(
                image=image,
                prompt=prompt,
                output_root=out,
                boxes=boxes,
                points=points,
                instance_index=instance,
                segmenter=segmenter,
                reconstructor=reconstructor,
                seed=seed,
                force=force,
                return_state=True,
            )
    except LocalApiDidNotStart as exc:
        console.print(f"[red]error:[/red] {image}: {exc}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None
    wall = time.perf_counter() - started
    if not state.is_completed():
        console.print(f"[red]failed:[/red] {state.message}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    result = RunResult.model_validate(state.result())
    print(f"output: {result.output_prefix}")
    print(summary_line(result) + f" (wall {wall:.1f} s)")
    if result.status == "no_object":
        raise typer.Exit(EXIT_NO_OBJECT)
    if result.status != "completed":
        raise typer.Exit(EXIT_FAILED)


@app.command("review-server")
def review_server(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    token: Annotated[
        str | None, typer.Option(envvar="SAM3D_REVIEW_TOKEN", help="Access token (default: a new random one).")
    ] = None,
) -> None:
    """Serve the mask review page for paused image-to-3d runs (needs PREFECT_API_URL of a Prefect server)."""
    import uvicorn

    from sam3d_pipeline.review.server import create_app, new_token

    token = token or new_token()
    print(f"review page: http://{host}:{port}/#token={token}", flush=True)
    uvicorn.run(create_app(token), host=host, port=port, log_level="warning")


@app.command("gpu-worker")
def gpu_worker(
    idle_s: Annotated[float | None, typer.Option(help="Exit after this long idle (default SAM3D_GPU_IDLE_S).")] = None,
) -> None:
    """Run one warm GPU worker session here: serve the model stages of flows that use SAM3D_GPU_STAGES=workers
    (needs PREFECT_API_URL of a Prefect server) until idle, then exit."""
    from flows.gpu_worker import gpu_worker as session

    print(f"GPU worker session: {session(idle_s=idle_s)}", flush=True)


from sam3d_pipeline.stack_cli import down, events_bridge, up  # noqa: E402

app.command("events-bridge")(events_bridge)
app.command("up")(up)
app.command("down")(down)

from .catalog_cli import catalog as _catalog  # noqa: E402

app.command("catalog")(_catalog)

from .cli_sam3 import doctor, export_decoder  # noqa: E402 (subcommands live in their own module)

app.command("doctor")(doctor)
app.command("export-decoder")(export_decoder)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
