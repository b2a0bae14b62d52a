"""Every environment variable the product reads is documented, and every documented one is read: the settings
models (listed in docs/settings.md, generated from them), the variables code reads itself, the placeholders of the
Prefect deployment files and the GPU images' entry point."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from sam3d_pipeline.cli.settings_doc import MODELS, reference
from sam3d_pipeline.settings import Settings, WebhookSettings, environment_variables

ROOT = Path(__file__).resolve().parents[1]
NAME = r"SAM3D_[A-Z0-9_]*[A-Z0-9]"
PYTHON_READS = (
    re.compile(rf"""(?:environ\.get|environ\[|getenv|envvar=)\(?\s*["']({NAME})["']"""),
    re.compile(rf"""^\s*[A-Z_]*ENV\s*=\s*["']({NAME})["']""", re.M),  # a name constant the code reads with
)
TEMPLATE_READS = re.compile(rf"\{{\{{\s*\$({NAME})\s*\}}\}}")  # prefect.yaml's {{ $VAR }}
SHELL_READS = re.compile(rf"\$\{{?({NAME})")
# Read, and on purpose in no document: a token the command line hands to its own child processes, and the mark
# of the one process it starts to outlive it (the reused local Prefect API server), and the mark of a command forked
# from that server's warm companion.
INTERNAL = {"SAM3D_CLI_GUARD", "SAM3D_OUTLIVES_COMMAND", "SAM3D_WARM_CLI_CHILD"}


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines()]


def read_variables() -> set[str]:
    names = {name for _, model in MODELS for name in environment_variables(model)}
    for path in _tracked("sam3d_pipeline/*.py", "flows/*.py", "tasks/*.py", "deployments/*.py", "gpu_worker/*.py"):
        text = path.read_text()
        names |= {n for pattern in PYTHON_READS for n in pattern.findall(text)}
    for path in (ROOT / "prefect.yaml", ROOT / "deployments" / "prefect-aws.yaml"):
        names |= set(TEMPLATE_READS.findall(path.read_text()))
    names |= set(SHELL_READS.findall((ROOT / "gpu_worker" / "entrypoint.sh").read_text()))
    return names


def documented_variables() -> set[str]:
    return {n for path in _tracked("*.md") for n in re.findall(rf"\b{NAME}\b", path.read_text())}


def test_the_settings_reference_is_generated_from_the_settings():
    assert (ROOT / "docs" / "settings.md").read_text() == reference(), (
        "regenerate: python -m sam3d_pipeline.cli.settings_doc > docs/settings.md")


def test_every_variable_read_is_documented_and_every_documented_one_is_read():
    read, documented = read_variables(), documented_variables()
    assert not (read - INTERNAL) - documented, f"read but documented nowhere: {sorted((read - INTERNAL) - documented)}"
    assert not documented - read, f"documented but read by nothing: {sorted(documented - read)}"


def test_a_group_reads_the_variables_users_set(monkeypatch):
    """Grouping settings renamed no variable: SAM3D_WEBHOOK_* still set the webhook settings."""
    monkeypatch.setenv("SAM3D_WEBHOOK_SECRET", "k")
    monkeypatch.setenv("SAM3D_WEBHOOK_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SAM3D_WEBHOOK_ALLOW_NETWORKS", "10.0.0.0/16")
    hooks = Settings().webhook
    assert (hooks.secret, hooks.max_attempts, hooks.allow_networks) == ("k", 3, "10.0.0.0/16")
    assert {f"SAM3D_WEBHOOK_{name.upper()}" for name in WebhookSettings.model_fields} <= set(
        environment_variables(Settings))
