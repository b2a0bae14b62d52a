"""``doctor`` and ``export-decoder`` subcommands (registered in ``cli.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def doctor(
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero on warnings too.")] = False,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Also run a text prompt and a click through sam3 and print timings.")
    ] = False,
) -> None:
    """Preflight: Python, torch/device, sam3, vocabulary, checkpoint, S3, Prefect API, work pools."""
    from pydantic import ValidationError

    from sam3d_pipeline.cli.doctor import exit_code, run_checks
    from sam3d_pipeline.settings import get_settings

    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "SAM3D_" + "_".join(str(part) for part in error["loc"]).upper()
            print(f"fail settings: {name}={error.get('input')!r}: {error['msg']} -> fix: correct or unset {name}")
        print("doctor: FAILED")
        raise typer.Exit(1) from None
    checks = run_checks(settings, smoke_test=smoke)
    for check in checks:
        print(check.line(), flush=True)
    code = exit_code(checks, strict)
    print("doctor: " + ("FAILED" if code else "passed"))
    raise typer.Exit(code)


def export_decoder(
    out: Annotated[Path, typer.Option("--out", help="Where to write the ONNX file.")] = Path("sam3_decoder.onnx"),
    quantize: Annotated[
        bool, typer.Option("--quantize", help="Also write a uint8 dynamically quantised copy.")
    ] = False,
) -> None:
    """Export SAM 3's click decoder (prompt encoder + mask decoder) to ONNX and check it against torch."""
    from sam3d_pipeline.backends.sam3.onnx_export import export
    from sam3d_pipeline.backends.sam3.segmenter import load_model
    from sam3d_pipeline.errors import PipelineError
    from sam3d_pipeline.settings import get_settings

    try:
        loaded = load_model(get_settings())
        report = export(loaded.model, out, quantize=quantize)
    except (PipelineError, RuntimeError) as exc:
        print(f"error: {exc}")
        raise typer.Exit(1) from None
    report["weights"] = loaded.weights
    print(json.dumps(report, indent=2))
