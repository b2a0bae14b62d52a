"""Backend registry: name → lazily imported builder, and the ``auto`` choice.

Heavy packages (torch, sam3, SAM 3D Objects) are imported only when their backend is built.
Built backends are cached per process, keyed by name and settings, so a model loads once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sam3d_pipeline.backends.base import Reconstructor, Segmenter
from sam3d_pipeline.errors import BackendUnavailableError
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.types import BackendInfo


@dataclass(frozen=True)
class BackendEntry:
    """How to build one backend and how to tell, cheaply, whether it can run here."""

    name: str
    target: str  # "module:Class"; the class takes (settings)
    requires: tuple[str, ...] = ()  # importable packages it needs
    install_hint: str = ""
    usable: Callable[[Settings], str | None] | None = None  # returns a reason it cannot run, or None
    # "module:function" taking (settings) and returning its BackendInfo without building the backend, loading a
    # model or importing torch: the orchestrator plans output keys with it. None: read info() of a built one.
    describe: str | None = None

    def unavailable_reason(self, settings: Settings) -> str | None:
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return f"package '{package}' is not installed ({self.install_hint})"
        module_name = self.target.split(":", 1)[0]
        if importlib.util.find_spec(module_name) is None:
            return f"backend module {module_name} is not part of this build"
        if self.usable is not None:
            return self.usable(settings)
        return None


def _sam3_usable(settings: Settings) -> str | None:
    """sam3 runs only with a checkpoint configured (or random init asked for) and a package that imports."""
    if not settings.sam3_checkpoint and not settings.sam3_random_init:
        return "no checkpoint configured (set SAM3D_SAM3_CHECKPOINT)"
    from sam3d_pipeline.backends.sam3.segmenter import usable

    return usable(settings)


SEGMENTERS: dict[str, BackendEntry] = {
    "sam3": BackendEntry(
        name="sam3",
        target="sam3d_pipeline.backends.sam3.segmenter:Sam3Segmenter",
        requires=("torch", "sam3"),
        install_hint="pip install 'sam3d-pipeline[sam3]'",
        usable=lambda settings: _sam3_usable(settings),
        describe="sam3d_pipeline.backends.sam3.version:describe",
    ),
    "lite": BackendEntry(name="lite", target="sam3d_pipeline.backends.lite_segmenter:LiteSegmenter",
                         describe="sam3d_pipeline.backends.lite_segmenter:describe"),
}
RECONSTRUCTORS: dict[str, BackendEntry] = {
    "sam3d": BackendEntry(
        name="sam3d",
        target="sam3d_pipeline.backends.sam3d_reconstructor:Sam3dReconstructor",
        requires=("torch", "sam3d_objects"),
        install_hint="needs CUDA; use the gpu_worker image",
        describe="sam3d_pipeline.backends.sam3d_reconstructor:describe",
    ),
    "lite": BackendEntry(name="lite", target="sam3d_pipeline.backends.lite_reconstructor:LiteReconstructor",
                         describe="sam3d_pipeline.backends.lite_reconstructor:describe"),
}
# Preference order for "auto": the real model first, the CPU backend last (always usable).
AUTO_ORDER = {"segmenter": ("sam3", "lite"), "reconstructor": ("sam3d", "lite")}


@dataclass(frozen=True)
class Resolved:
    """The backend a requested name resolved to, and why."""

    role: str
    requested: str
    name: str
    reason: str


def _registry(role: str) -> dict[str, BackendEntry]:
    if role == "segmenter":
        return SEGMENTERS
    if role == "reconstructor":
        return RECONSTRUCTORS
    raise ValueError(f"unknown backend role {role!r}")


def resolve(role: str, requested: str, settings: Settings | None = None) -> Resolved:
    """Resolve ``auto`` (or check an explicit name) without loading any model.

    Raises:
        BackendUnavailableError: an explicit backend that cannot run here, or an unknown name.
    """
    s = settings or get_settings()
    registry = _registry(role)
    if requested == "auto" and getattr(s, role) != "auto":  # SAM3D_SEGMENTER / SAM3D_RECONSTRUCTOR name it
        return resolve(role, getattr(s, role), s)
    if s.gpu_stages != "inline":  # the model stages run on the GPU workers, not in this process
        name = AUTO_ORDER[role][0] if requested == "auto" else requested
        if name not in registry:
            raise BackendUnavailableError(f"unknown {role} {requested!r}; choose from auto, {', '.join(registry)}")
        module_name = (registry[name].describe or registry[name].target).split(":", 1)[0]
        if importlib.util.find_spec(module_name) is None:  # its description is still needed for the output key
            raise BackendUnavailableError(f"{role} {name!r}: backend module {module_name} is not part of this build")
        return Resolved(role, requested, name, f"{name} runs on the GPU workers (SAM3D_GPU_STAGES={s.gpu_stages})")
    if requested == "auto":
        skipped = []
        for name in AUTO_ORDER[role]:
            reason = registry[name].unavailable_reason(s)
            if reason is None:
                why = f"auto chose {name}" + (f" ({'; '.join(skipped)})" if skipped else "")
                return Resolved(role, requested, name, why)
            skipped.append(f"{name} unavailable: {reason}")
        raise BackendUnavailableError(f"no usable {role}: {'; '.join(skipped)}")
    if requested not in registry:
        raise BackendUnavailableError(f"unknown {role} {requested!r}; choose from auto, {', '.join(registry)}")
    reason = registry[requested].unavailable_reason(s)
    if reason is not None:
        raise BackendUnavailableError(f"{role} {requested!r} cannot run here: {reason}")
    return Resolved(role, requested, requested, f"{requested} requested")


_CACHE: dict[tuple[str, str, str], Any] = {}
_CACHE_LOCK = threading.Lock()  # concurrent tasks (catalog batches) must not build a model twice


def _build(role: str, name: str, settings: Settings) -> Any:
    key = (role, name, settings.model_dump_json())
    with _CACHE_LOCK:
        if key not in _CACHE:
            entry = _registry(role)[name]
            module_name, class_name = entry.target.split(":", 1)
            cls = getattr(importlib.import_module(module_name), class_name)
            _CACHE[key] = cls(settings)
        return _CACHE[key]


def load(role: str, name: str, settings: Settings | None = None) -> float:
    """Make the backend ready (built, its model in memory). Returns the seconds that took now: 0.0 when this
    process already had it, which is what a warm GPU worker reports."""
    s = settings or get_settings()
    t = time.perf_counter()
    with _CACHE_LOCK:
        cached = (role, name, s.model_dump_json()) in _CACHE
    backend = _build(role, name, s)
    loader = getattr(backend, "load_model", None)
    loaded_now = loader() if callable(loader) else False
    return 0.0 if cached and not loaded_now else time.perf_counter() - t


def describe(role: str, name: str, settings: Settings | None = None) -> BackendInfo:
    """The ``BackendInfo`` of a resolved backend (name, version for output keys, device, limits).

    Loads no model and, for sam3, imports neither torch nor sam3: the orchestrator plans output keys with it.
    """
    s = settings or get_settings()
    entry = _registry(role)[name]
    if entry.describe is not None:
        module_name, function = entry.describe.split(":", 1)
        return getattr(importlib.import_module(module_name), function)(s)
    return _build(role, name, s).info()


def get_segmenter(name: str, settings: Settings | None = None) -> Segmenter:
    """The process-wide segmenter called ``name`` (already resolved, not ``auto``)."""
    return _build("segmenter", name, settings or get_settings())


def get_reconstructor(name: str, settings: Settings | None = None) -> Reconstructor:
    """The process-wide reconstructor called ``name`` (already resolved, not ``auto``)."""
    return _build("reconstructor", name, settings or get_settings())


def clear_cache() -> None:
    """Forget built backends (frees their models)."""
    _CACHE.clear()
