"""The environment a GPU worker session gets in production, read from the files that give it (never re-typed):
the image's Dockerfile ``ENV`` instructions, the GPU pool's base job template (``env`` defaults) and the
deployment's ``job_variables.env`` in ``prefect.yaml``, merged in that order (ECS: image ENV, then the task's
container overrides; the deployment's env merged over the pool's, as Prefect does).

Two things are relocated for this machine, and only those: the image's checkpoint folder (``/opt/checkpoints``)
to a test folder, and the image's project folder (``/opt/sam3d-pipeline``) to this checkout. ``PATH`` and
``VIRTUAL_ENV`` stay this machine's (the test's interpreter is the image's venv here). ``{{ $VAR }}`` placeholders
in ``prefect.yaml`` are filled from ``deploy_env`` the way ``prefect deploy`` fills them from its shell.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE_CHECKPOINTS = "/opt/checkpoints"
IMAGE_PROJECT = "/opt/sam3d-pipeline"
MACHINE_SPECIFIC = ("PATH", "VIRTUAL_ENV")
_REF = re.compile(r"\$(\w+)|\$\{(\w+)\}")
_PLACEHOLDER = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    """Every ``ENV`` of the Dockerfile's last stage, in order, with ``$VAR`` / ``${VAR}`` expanded from earlier
    ENV and ARG defaults (as Docker does; ARGs are not kept in the environment)."""
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    for word, rest in _instructions(path.read_text()):
        if word == "FROM":
            env = {}  # a new stage starts from its base image's environment
        elif word == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = shlex.split(default)[0] if default.strip() else ""
        elif word == "ENV":
            parts = shlex.split(rest)
            pairs = [p.partition("=") for p in parts] if "=" in parts[0] else [(parts[0], "=", " ".join(parts[1:]))]
            for name, _, value in pairs:
                known = args | env
                env[name] = _REF.sub(lambda m, known=known: known.get(m[1] or m[2], ""), value)
    return env


def template_env(path: Path = ROOT / "deployments" / "ecs-gpu-job-template.json") -> dict[str, str]:
    """The GPU pool's ``env`` defaults (the base job template's ``variables.properties.env.default``)."""
    return dict(json.loads(path.read_text())["variables"]["properties"]["env"]["default"])


def deployment(name: str, path: Path = ROOT / "prefect.yaml") -> dict:
    for dep in yaml.safe_load(path.read_text())["deployments"]:
        if dep["name"] == name:
            return dep
    raise KeyError(f"no deployment {name!r} in {path}")


def deployment_env(name: str, deploy_env: dict[str, str], path: Path = ROOT / "prefect.yaml") -> dict[str, str]:
    """The deployment's ``job_variables.env`` with ``{{ $VAR }}`` filled from ``deploy_env``.

    Raises:
        KeyError: a placeholder ``deploy_env`` does not give (``prefect deploy`` would leave it unresolved).
    """
    env = deployment(name, path).get("work_pool", {}).get("job_variables", {}).get("env", {}) or {}
    return {k: _PLACEHOLDER.sub(lambda m: deploy_env[m[1]], str(v)) for k, v in env.items()}


def session_env(dockerfile: Path, deployment_name: str, checkpoints: Path,
                deploy_env: dict[str, str] | None = None) -> dict[str, str]:
    """The worker session's environment as the image, the pool and the deployment give it, relocated (see
    the module docstring). Returns only those variables; the caller adds this machine's connection settings."""
    merged = dockerfile_env(dockerfile) | template_env() | deployment_env(deployment_name, deploy_env or {})
    out = {}
    for name, value in merged.items():
        if name in MACHINE_SPECIFIC:
            continue
        out[name] = value.replace(IMAGE_CHECKPOINTS, str(checkpoints)).replace(IMAGE_PROJECT, str(ROOT))
    return out


def process_env(image_env: dict[str, str], **connection: str) -> dict[str, str]:
    """This process's environment less every ``SAM3D_`` / ``PREFECT_`` setting, then the image's, then the
    connection settings (API URL, S3 endpoint): nothing of the test's own configuration leaks into the session."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SAM3D_", "PREFECT_"))}
    env = base | image_env | connection
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), image_env.get("PYTHONPATH", "")) if p)
    return env
