"""``sam3d-pipeline catalog``: run the catalog-batch flow on a manifest, prefix or folder and summarise it."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer

EXIT_FAILED = 1
EXIT_NO_OBJECT = 3


def catalog(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Manifest (.csv/.jsonl), s3://bucket/prefix or folder.")],
    out: Annotated[str | None, typer.Option("--out", help="Output root: directory or s3://bucket/prefix.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Default prompt (rows without one, prefixes).")]
    = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Items / batches in flight.")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Items per GPU batch (one model load).")] = 8,
    gpu_limit: Annotated[str, typer.Option("--gpu-limit", help="Prefect global concurrency limit name.")] = "sam3d-gpu",
    gpu_slots: Annotated[int | None, typer.Option("--gpu-slots", min=1, help="Resize/create that limit.")] = None,
    segmenter: Annotated[str, typer.Option("--segmenter", help="auto|lite|sam3")] = "auto",
    reconstructor: Annotated[str, typer.Option("--reconstructor", help="auto|lite|sam3d")] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Recompute items that already have a result.")] = False,
) -> None:
    """Turn a catalog of photos into 3D assets; skip finished items; write catalog.json and index.html.

    Exit code 0 when every item has a 3D asset, 3 when none failed but some had no object, 1 otherwise; 2 for bad
    usage (a missing source, ``--out`` a file, a blank or over-long prompt), before Prefect starts.
    """
    from sam3d_pipeline.cli.common import (
        check_output_root,
        debug_requested,
        report_failure,
        run_options,
        say,
        say_unexpected,
    )

    debug = debug_requested(ctx)
    if segmenter not in ("auto", "lite", "sam3"):
        raise typer.BadParameter(f"{segmenter!r}: choose auto, lite or sam3", param_hint="--segmenter")
    if reconstructor not in ("auto", "lite", "sam3d"):
        raise typer.BadParameter(f"{reconstructor!r}: choose auto, lite or sam3d", param_hint="--reconstructor")
    if not source.startswith("s3://") and not os.path.exists(source):
        raise typer.BadParameter(f"{source}: no such manifest or folder", param_hint="SOURCE")
    check_output_root(out)
    # the options every item runs with, checked by the flows' own model (rows without a prompt need --prompt:
    # the flow says so per row; a stand-in prompt here checks the rest)
    run_options(prompt="item" if prompt is None else prompt, segmenter=segmenter, reconstructor=reconstructor,
                seed=seed)
    say("catalog-batch", source, style="bold")
    from sam3d_pipeline.settings import local_prefect_defaults

    local_prefect_defaults()
    started = time.perf_counter()
    from flows.catalog_batch import catalog_batch
    from sam3d_pipeline.cli.local import LocalApiDidNotStart, cli_run_settings

    try:
        with cli_run_settings(debug=debug):
            state = catalog_batch(
                source=source, output_root=out, default_prompt=prompt, concurrency=concurrency,
                batch_size=batch_size, gpu_limit=gpu_limit, gpu_slots=gpu_slots, segmenter=segmenter,
                reconstructor=reconstructor, seed=seed, force=force, return_state=True,
            )
    except LocalApiDidNotStart as exc:
        say("error:", f"{source}: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except Exception as exc:  # noqa: BLE001 (a bug or an unreachable Prefect API: one line unless --debug)
        if debug:
            raise
        say_unexpected(source, exc)
        raise typer.Exit(EXIT_FAILED) from None
    wall = time.perf_counter() - started
    outcome = state.result(raise_on_failure=False) if state.is_failed() else None
    if not state.is_completed() and not (isinstance(outcome, dict) and "counts" in outcome):
        report_failure(state, source, debug)  # the run itself failed, before it could account for its items
        raise typer.Exit(EXIT_FAILED)
    outcome = outcome if isinstance(outcome, dict) else state.result()
    for item in outcome["items"]:
        if item["status"] == "failed":
            print(f"failed: {item['id']} (line {item['line']}): {(item.get('error') or {}).get('message')}")
    print(f"catalog: {outcome['catalog']}")
    print(f"gallery: {outcome['gallery']}")
    c = outcome["counts"]
    print(f"catalog: {len(outcome['items'])} item(s): {c['completed']} completed, {c['skipped']} skipped, "
          f"{c['no_object']} no_object, {c['failed']} failed"
          + (f", {c['duplicate']} duplicate" if c.get("duplicate") else "") + f" (wall {wall:.1f} s)")
    if outcome["counts"]["failed"]:
        raise typer.Exit(EXIT_FAILED)
    if not outcome["all_succeeded"]:
        raise typer.Exit(EXIT_NO_OBJECT)
