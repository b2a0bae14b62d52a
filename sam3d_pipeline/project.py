"""The project folder: the checkout (or an image's copy of it, ``/opt/sam3d-pipeline``) that holds ``prefect.yaml``
and the Prefect code, ``flows/`` and ``tasks/``.

``flows`` and ``tasks`` are folders of the project, not packages of the installed distribution: the wheel ships
``sam3d_pipeline`` alone, so it never claims those two names in an environment's site-packages. They are imported
from the project folder, by whoever runs them:

- Prefect, for a deployment's runs: the ``pull`` step of ``prefect.yaml`` enters the folder
  (``set_working_directory``), and Prefect loads the entrypoint (``flows/image_to_3d.py:image_to_3d``) with the
  working directory on ``sys.path``;
- the command line (``run``, ``catalog``, ``gpu-worker``), which puts the folder on ``sys.path`` when it is imported
  (:func:`put_on_path`);
- any other process of the images, whose ``PYTHONPATH`` names the folder.

The folder is ``SAM3D_PROJECT_DIR`` when set, else the one above this package (a checkout, or an editable install
of one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_DIR_ENV = "SAM3D_PROJECT_DIR"
ABOVE_PACKAGE = Path(__file__).resolve().parents[1]


def project_dir() -> Path:
    """The project folder: ``SAM3D_PROJECT_DIR``, else the folder above this package."""
    given = os.environ.get(PROJECT_DIR_ENV)
    return Path(given).resolve() if given else ABOVE_PACKAGE


def put_on_path() -> Path | None:
    """Make ``flows`` and ``tasks`` importable from the project folder (first on ``sys.path``, so another
    distribution's package of the same name never stands in for them). Returns the folder, or None when it holds
    no ``flows`` package (an installed wheel without ``SAM3D_PROJECT_DIR``: the command line's flows are missing)."""
    folder = project_dir()
    if not (folder / "flows" / "__init__.py").is_file():
        return None
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder
