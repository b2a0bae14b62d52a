"""The browser packages the web server serves (the studio's and gallery's 3D viewer, the review page's click
decoder runtime): pinned in ``package-lock.json`` files inside the package and installed from npm by the first
command that serves them (``up``, ``web``, ``review-server``), so a fresh clone's ``make demo`` then ``up`` shows
the GLB in the viewer. Nothing is fetched at page load from a CDN.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BrowserPackage:
    """An npm package folder of ours and the file that shows it is installed."""

    what: str
    folder: Path
    marker: Path

    @property
    def installed(self) -> bool:
        return self.marker.is_file()


PACKAGES = (
    BrowserPackage("3D viewer (@google/model-viewer)", PACKAGE / "gallery",
                   PACKAGE / "gallery" / "node_modules" / "@google" / "model-viewer" / "dist" / "model-viewer.min.js"),
    BrowserPackage("click decoder runtime (onnxruntime-web)", PACKAGE / "review" / "web",
                   PACKAGE / "review" / "web" / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.mjs"),
)


def ensure_browser_packages(packages: tuple[BrowserPackage, ...] = PACKAGES, timeout_s: float = 600) -> list[str]:
    """Install (``npm ci``, exactly the locked versions) each package that is missing.

    Returns:
        One line per package that is still missing, saying what the pages lose and how to install it (npm not on
        the PATH, or ``npm ci`` failed); empty when everything is in place.
    """
    problems = []
    npm = shutil.which("npm")
    for package in packages:
        if package.installed:
            continue
        if npm is None:
            problems.append(f"{package.what} is not installed and npm is not on the PATH: pages that need it will "
                            "not work (install Node.js and npm, then run `make install`)")
            continue
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=package.folder,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0 or not package.installed:
            problems.append(f"{package.what}: `npm ci` in {package.folder} failed: {done.stderr.strip()[-300:]}")
    return problems
