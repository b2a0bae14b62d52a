"""The browser packages come with the first command that serves them (a fresh clone's `make demo`, then `up`)."""

from __future__ import annotations

import shutil

import pytest

from sam3d_pipeline.web import assets


def test_the_installed_markers_are_what_the_pages_load():
    """The files each marker names are the ones the pages import (so 'installed' means the page works)."""
    viewer, ort = assets.PACKAGES
    assert viewer.marker.name == "model-viewer.min.js" and ort.marker.name == "ort.wasm.min.mjs"
    script = (assets.PACKAGE / "review" / "static" / "clickdecoder.js").read_text()
    assert f'from "/static/ort/{ort.marker.name}"' in script


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is what installs them")
def test_a_missing_package_is_installed_from_its_lock_file(tmp_path):
    folder = tmp_path / "gallery"
    folder.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(assets.PACKAGE / "gallery" / name, folder / name)
    package = assets.BrowserPackage("viewer", folder, folder / "node_modules" / "@google" / "model-viewer" / "dist"
                                    / "model-viewer.min.js")
    assert not package.installed
    assert assets.ensure_browser_packages((package,)) == []
    assert package.installed


def test_without_npm_the_problem_is_said(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda _: None)
    package = assets.BrowserPackage("viewer", tmp_path, tmp_path / "missing.js")
    (problem,) = assets.ensure_browser_packages((package,))
    assert "npm is not on the PATH" in problem and "make install" in problem
