"""The settings reference, ``docs/settings.md``: every environment variable the settings read, with its default
and description, from the settings models themselves (``python -m sam3d_pipeline.cli.settings_doc >
docs/settings.md``; a test keeps the file current)."""

from __future__ import annotations

from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from sam3d_pipeline.events.settings import EventSettings
from sam3d_pipeline.settings import Settings, environment_variables

MODELS: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("The pipeline, the web server and the GPU workers", Settings),
    ("Which uploads start a run, and the events bridge", EventSettings),
)


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple | list):
        return f"`{','.join(map(str, value))}`"
    return f"`{value}`" if value != "" else "empty"


def reference() -> str:
    lines = ["# Settings", "",
             "Generated from the settings models by `python -m sam3d_pipeline.cli.settings_doc > docs/settings.md`.",
             "Every variable is read from the environment; a variable listed in both tables is read by both parts."]
    for title, model in MODELS:
        lines += ["", f"## {title}", "", "| variable | default | what |", "|---|---|---|"]
        for name, info in environment_variables(model).items():
            default = info.get_default(call_default_factory=True)
            shown = "required" if default is PydanticUndefined else _default(default)
            what = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {shown} | {what} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
