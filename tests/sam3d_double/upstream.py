"""SAM 3D Objects' own modules at cf06676 for tests on a CPU, from PyPI ``sam3d==0.1.2``, checked byte for byte.

The third-party package ``sam3d`` 0.1.2 ships a copy of Meta's ``sam3d_objects`` under
``sam3d/third_party/meta/sam3d_objects``. ``assemble`` copies the files whose sha256 equals upstream's at
cf066761706cd02b07e2fc6274570ec8cdafb683 (``upstream_cf06676.sha256``: hashes from the git tree, no code) into a
temporary folder, so tests import upstream's bytes, not the package's edits:

- 101 of the 106 files are identical.
- ``pipeline/inference_pipeline.py`` differs only by two added lines (an ``else: gpu_name = "CPU"`` branch in
  ``set_attention_backend``): dropping them gives upstream's bytes back, which the hash check confirms.
- ``inference_utils.py``, ``inference_pipeline_pointmap.py``, ``layout_post_optimization_utils.py`` and
  ``renderers/gaussian_render.py`` were changed by the package: they are left out (never imported as upstream);
  ``inference_utils`` and ``gaussian_render`` are stubbed because modules we test import names from them.

``imported`` then makes them importable, with stand-ins for the third-party packages they import that cannot
install here (CUDA-only or absent: pytorch3d, spconv, kaolin, gsplat, xatlas, ...). Every stub is an empty module
whose attributes are placeholder classes; nothing of upstream's code is stubbed beyond ``inference_utils``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "sam3d==0.1.2"
UPSTREAM_COMMIT = "cf066761706cd02b07e2fc6274570ec8cdafb683"
HASHES = Path(__file__).with_name("upstream_cf06676.sha256")
# Lines (1-based, inclusive) the package added to an upstream file; dropping them restores upstream's bytes.
PACKAGE_ADDED_LINES = {"sam3d_objects/pipeline/inference_pipeline.py": (14, 15)}
# Files the package changed beyond added lines: not upstream, left out.
PACKAGE_CHANGED = frozenset({
    "sam3d_objects/pipeline/inference_utils.py",
    "sam3d_objects/pipeline/inference_pipeline_pointmap.py",
    "sam3d_objects/pipeline/layout_post_optimization_utils.py",
    "sam3d_objects/model/backbone/tdfy_dit/renderers/gaussian_render.py",
})
# Upstream modules replaced by a stub when imported (left out above, imported by a module we test).
STUBBED_UPSTREAM = (
    "sam3d_objects.pipeline.inference_utils",
    "sam3d_objects.model.backbone.tdfy_dit.renderers.gaussian_render",
)
# Third-party imports of the modules we test that cannot install on this CPU machine (stubbed only when absent).
STUBBED_PACKAGES = (
    "matplotlib", "matplotlib.pyplot", "lightning", "lightning.pytorch", "lightning.pytorch.utilities",
    "lightning.pytorch.utilities.consolidate_checkpoint", "optree", "astor", "spconv", "spconv.pytorch", "utils3d",
    "xatlas", "pyvista", "pymeshfix", "igraph", "easydict", "plyfile", "kaolin", "kaolin.utils",
    "kaolin.utils.testing", "gsplat", "open3d", "pytorch3d",
)


def expected_hashes() -> dict[str, str]:
    """``{path: sha256}`` of upstream's files at ``UPSTREAM_COMMIT``."""
    out = {}
    for line in HASHES.read_text().splitlines():
        if line and not line.startswith("#"):
            digest, path = line.split(maxsplit=1)
            out[path] = digest
    return out


def package_root() -> Path | None:
    """``.../site-packages/sam3d/third_party/meta`` of the installed package, or None."""
    spec = importlib.util.find_spec("sam3d")
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent / "third_party" / "meta"
    return root if (root / "sam3d_objects").is_dir() else None


def _upstream_bytes(path: str, data: bytes) -> bytes:
    if path not in PACKAGE_ADDED_LINES:
        return data
    first, last = PACKAGE_ADDED_LINES[path]
    lines = data.splitlines(keepends=True)
    return b"".join(lines[: first - 1] + lines[last:])


def assemble(dest: Path) -> dict[str, list[str]]:
    """Copy the package's files that are upstream's (after dropping its added lines) under ``dest``.

    Returns:
        ``{"verified": [paths copied], "left_out": [paths whose bytes are not upstream's], "absent": [...]}``.

    Raises:
        RuntimeError: the package is not installed.
    """
    root = package_root()
    if root is None:
        raise RuntimeError(f"{PACKAGE} is not installed (pip install -e '.[dev]')")
    report: dict[str, list[str]] = {"verified": [], "left_out": [], "absent": []}
    for path, digest in sorted(expected_hashes().items()):
        src = root / path
        if not src.is_file():
            report["absent"].append(path)
            continue
        data = _upstream_bytes(path, src.read_bytes())
        if hashlib.sha256(data).hexdigest() != digest:
            report["left_out"].append(path)
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        report["verified"].append(path)
    return report


class _Stub(types.ModuleType):
    """An absent package: any attribute is a placeholder class (so ``from x import Y`` and annotations work)."""

    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, placeholder)
        return placeholder


def _stub(name: str) -> None:
    module = sys.modules[name] = _Stub(name)
    parent, _, child = name.rpartition(".")
    if parent:
        if parent not in sys.modules:
            _stub(parent)
        setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def imported(dest: Path) -> Iterator[types.SimpleNamespace]:
    """Import the assembled upstream modules from ``dest``; they and the stubs are removed again on exit.

    ``inference_pipeline.py`` asks for the GPU's name at import (``set_attention_backend``, L11-21, fails with a
    NameError on a machine without CUDA): CUDA is reported present, named "NVIDIA A10G", during the import only.

    Yields:
        A namespace with ``inference_pipeline``, ``depth_models`` (base, moge), ``dino``, ``postprocessing_utils``.
    """
    import torch

    before = set(sys.modules)
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")
    sys.path.insert(0, str(dest))
    for name in STUBBED_UPSTREAM:  # the module alone: its real parent packages import from the tree
        sys.modules[name] = _Stub(name)
    for name in STUBBED_PACKAGES:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                _stub(name)
        except (ImportError, ValueError):
            _stub(name)
    saved = torch.cuda.is_available, torch.cuda.get_device_name
    torch.cuda.is_available, torch.cuda.get_device_name = (lambda: True), (lambda *a, **k: "NVIDIA A10G")
    try:
        import sam3d_objects.model.backbone.dit.embedder.dino as dino
        import sam3d_objects.model.backbone.tdfy_dit.utils.postprocessing_utils as postprocessing_utils
        import sam3d_objects.pipeline.depth_models.base as depth_base
        import sam3d_objects.pipeline.depth_models.moge as moge
        import sam3d_objects.pipeline.inference_pipeline as inference_pipeline
    finally:
        torch.cuda.is_available, torch.cuda.get_device_name = saved
    try:
        for module in (dino, postprocessing_utils, depth_base, moge, inference_pipeline):
            assert str(dest) in (module.__file__ or ""), f"{module.__name__} not imported from the verified tree"
        yield types.SimpleNamespace(inference_pipeline=inference_pipeline, depth_base=depth_base, moge=moge,
                                    dino=dino, postprocessing_utils=postprocessing_utils)
    finally:
        sys.path.remove(str(dest))
        for name in set(sys.modules) - before:  # upstream's modules and our stubs; real packages stay loaded
            if name.split(".")[0] == "sam3d_objects" or isinstance(sys.modules[name], _Stub):
                del sys.modules[name]
