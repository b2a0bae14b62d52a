"""What every command of the command line shares: exit codes, one-line messages, the output-root check, the run
options built from command-line values, and the report of a run that ended without a result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sam3d_pipeline.run.pipeline import RunOptions


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_OBJECT = 3


def debug_requested(ctx: typer.Context) -> bool:
    """Whether ``sam3d-pipeline --debug ...`` was given."""
    return bool((ctx.find_root().obj or {}).get("debug"))


def say(label: str, text: str, style: str = "red") -> None:
    """One line on stderr: ``label`` styled, ``text`` printed as it is (paths, prompts and messages may hold
    square brackets, which rich would otherwise read as markup)."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text.assemble((label, style), " ", text), soft_wrap=True)


def check_output_root(out: str | None, param_hint: str = "--out") -> None:
    """Refuse a local ``--out`` that is a file or lies under one (it could never hold the outputs).

    Raises:
        typer.BadParameter: naming the path and the file in the way.
    """
    if out is None or out.startswith("s3://"):
        return
    path = Path(out).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is under {candidate}, which is a file"
                raise typer.BadParameter(f"{out}: {where}, not a directory", param_hint=param_hint)
            return


_OPTION_OF_FIELD = {"prompt": "--prompt", "boxes": "--box", "points": "--point", "instance_index": "--instance",
                    "segmenter": "--segmenter", "reconstructor": "--reconstructor", "seed": "--seed",
                    "instances": "--instances", "profile": "--profile", "export": "--export"}


def run_options(**fields: Any) -> RunOptions:
    """The run's options checked by the flows' own model (:class:`~sam3d_pipeline.run.pipeline.RunOptions`: prompt
    length and blankness, finite coordinates, ...), before Prefect starts.

    Raises:
        typer.BadParameter: naming the option and what is wrong with it.
    """
    from pydantic import ValidationError

    from sam3d_pipeline.run.pipeline import RunOptions

    try:
        return RunOptions(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        reason = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_too_long":
            reason += f" (got {len(error['input'])})"
        raise typer.BadParameter(reason, param_hint=_OPTION_OF_FIELD.get(field, field)) from None


def say_unexpected(subject: str, exc: BaseException, debug: bool = False) -> None:
    """One line for an error that is not one of the pipeline's (a bug, an unreachable Prefect API)."""
    hint = "" if debug else "; `sam3d-pipeline --debug ...` shows the traceback"
    say("error:", f"{subject}: unexpected {type(exc).__name__}: {exc}{hint}")


def report_failure(state: Any, subject: str, debug: bool) -> None:
    """Print why a flow run ended without a result, in one line naming ``subject`` (the input).

    Errors of the pipeline's own classes (bad image, missing file, unusable backend, ...) print their message;
    anything else is a bug and says how to see its traceback.
    """
    from sam3d_pipeline.errors import PipelineError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 (a state without a readable result: report its message instead)
        exc = None
    if isinstance(exc, PipelineError):
        message = str(exc)
        named = subject in message or os.path.basename(subject.rstrip("/")) in message
        say("error:", message if named else f"{subject}: {message}")
    elif isinstance(exc, BaseException):
        say_unexpected(subject, exc, debug)
    else:
        say("failed:", f"{subject}: {state.message}")
