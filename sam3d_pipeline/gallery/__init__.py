"""The catalog's static gallery: ``index.html`` at the output root, one card per item.

Each card shows the item's overlay and status, every object reconstructed from it (index, score, which one is
selected), the chosen frame of a video, and links every asset (scene, each object's GLB / USDZ / OBJ);
items with a mesh open their ``object.glb`` in Google's ``<model-viewer>`` with its AR button (WebXR, Android
Scene Viewer, and iOS AR Quick Look through ``ios-src`` = the object's USDZ), installed from npm into
``sam3d_pipeline/gallery/node_modules`` by ``make install`` and copied next to ``index.html`` (nothing is
loaded from a CDN). Browsers refuse ES modules and GLB fetches from ``file://`` pages, so open the gallery
over HTTP, e.g. ``python -m http.server -d OUTPUT_ROOT``.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from sam3d_pipeline.storage import Storage

GALLERY_FILE = "index.html"
VIEWER_FILE = "model-viewer.min.js"
VIEWER_PACKAGE = "@google/model-viewer"
_HERE = Path(__file__).resolve().parent


def viewer_script_path() -> Path | None:
    """The bundled ``model-viewer.min.js`` (three.js included), or None when it is not installed.

    ``SAM3D_MODEL_VIEWER_JS`` overrides the location (for installs without the npm folder).
    """
    override = os.environ.get("SAM3D_MODEL_VIEWER_JS")
    path = Path(override) if override else _HERE / "node_modules" / VIEWER_PACKAGE / "dist" / VIEWER_FILE
    return path if path.is_file() else None


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#f6f6f4;color:#222}
h1{font-size:1.3rem;margin:0 0 .3rem} .counts span{margin-right:1rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1rem;margin-top:1rem}
.card{background:#fff;border-radius:8px;padding:.6rem;box-shadow:0 1px 3px #0002;font-size:.85rem}
.card img{width:100%;height:150px;object-fit:contain;background:#eee;border-radius:4px}
.noimg{height:150px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.status{font-weight:600;padding:0 .4rem;border-radius:4px}
.completed{background:#d7f5dd}.skipped{background:#dde8f7}.no_object{background:#fbeec8}.failed{background:#f8d4d4}.duplicate{background:#eee}
.error{color:#a00;word-break:break-word} button{margin-top:.4rem;cursor:pointer}
table.checks{border-collapse:collapse;font-size:.75rem;margin-top:.3rem}
table.checks td,table.checks th{border-bottom:1px solid #ddd;padding:.1rem .3rem;text-align:left}
.pass{color:#176b2c}.fail{color:#a00;font-weight:600}
dialog{width:min(90vw,800px);border:none;border-radius:8px;padding:.8rem}
model-viewer{width:100%;height:60vh;background:#20232a}
"""

_SCRIPT = """
const items = JSON.parse(document.getElementById('catalog-data').textContent).items;
const dialog = document.getElementById('viewer-dialog');
const viewer = document.getElementById('viewer');
const title = document.getElementById('viewer-title');
window.sam3dGallery = {
  items,
  open(id) {
    const item = items.find((it) => it.id === id);
    if (!item || !item.files.includes('object.glb')) return null;
    title.textContent = `${item.id}: ${item.prompt} (${item.reconstructor || '?'} reconstructor)`;
    const loaded = new Promise((resolve) => {
      const done = (event) => {
        viewer.removeEventListener('load', done); viewer.removeEventListener('error', done);
        resolve({id, event: event.type, src: viewer.src, detail: event.detail ? String(event.detail.type || '') : ''});
      };
      viewer.addEventListener('load', done); viewer.addEventListener('error', done);
    });
    const usdz = item.files.find((f) => f.startsWith('objects/') && f.endsWith('/object.usdz'));
    if (usdz) viewer.setAttribute('ios-src', `${item.prefix}/${usdz}`); else viewer.removeAttribute('ios-src');
    viewer.src = `${item.prefix}/object.glb`;
    if (!dialog.open) dialog.showModal();
    return loaded;
  },
};
document.querySelectorAll('button[data-open]').forEach((b) => b.addEventListener('click', () => {
  window.sam3dGallery.lastOpen = window.sam3dGallery.open(b.dataset.open);
}));
document.getElementById('viewer-close').addEventListener('click', () => dialog.close());
"""


DOWNLOAD_LABELS = {"object.glb": "GLB", "object.usdz": "USDZ", "object.obj": "OBJ", "object.mtl": "MTL",
                   "texture.png": "texture", "object.ply": "splat"}


def _downloads(files: set[str]) -> list[tuple[str, str]]:
    """``(label, file)`` download links: the scene, then each object's assets (``objects/<i>/...``)."""
    out = [("scene GLB", "scene.glb")] if "scene.glb" in files else []
    by_object: dict[int, list[str]] = {}
    for name in files:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "objects" and parts[1].isdigit() and parts[2] in DOWNLOAD_LABELS:
            by_object.setdefault(int(parts[1]), []).append(parts[2])
    order = list(DOWNLOAD_LABELS)
    for index in sorted(by_object):
        out += [(f"#{index} {DOWNLOAD_LABELS[n]}", f"objects/{index}/{n}")
                for n in sorted(by_object[index], key=order.index)]
    return out


def _checks_table(index: str, rules: list[dict[str, Any]]) -> str:
    """Object ``index``'s export checks: a summary line that opens a rule / limit / value / verdict table."""
    e = html.escape
    ok = sum(bool(r.get("pass")) for r in rules)
    rows = "".join(
        f'<tr><td>{e(str(r.get("rule")))}</td><td>{e(json.dumps(r.get("limit")))}</td>'
        f'<td>{e(json.dumps(r.get("value")))}</td>'
        f'<td class="{"pass" if r.get("pass") else "fail"}">{"pass" if r.get("pass") else "FAIL"}</td></tr>'
        for r in rules)
    return (f'<details class="checks" data-object="{e(index)}"><summary>#{e(index)} checks: {ok}/{len(rules)} '
            f'pass</summary><table class="checks"><tr><th>rule</th><th>limit</th><th>value</th><th></th></tr>'
            f"{rows}</table></details>")


def _card(item: dict[str, Any]) -> str:
    e = html.escape
    files = set(item.get("files") or [])
    prefix = item.get("prefix") or ""
    shown = {"skipped": f"skipped ({item.get('result_status')})",
             "duplicate": f"duplicate of {item.get('duplicate_of')} ({item.get('result_status') or 'pending'})"}.get(
        item["status"], item["status"])
    if prefix and "overlay.png" in files:
        picture = f'<img src="{e(prefix)}/overlay.png" alt="overlay for {e(item["id"])}" loading="lazy">'
    else:
        picture = '<div class="noimg">no overlay</div>'
    lines = [
        f'<div class="card" data-id="{e(item["id"])}" data-status="{e(item["status"])}">',
        picture,
        f'<div><span class="status {e(item["status"])}">{e(shown)}</span> <b>{e(item["id"])}</b></div>',
        f"<div>prompt: {e(item.get('prompt') or '')}</div>",
    ]
    if item.get("score") is not None:
        lines.append(f"<div>score {item['score']:.2f} · {item.get('instances', 0)} instance(s)</div>")
    if item.get("objects"):
        listed = ", ".join(f"#{o['index']}" + (f" {o['score']:.2f}" if o.get("score") is not None else "")
                           + (" (selected)" if o.get("selected") else "") for o in item["objects"])
        lines.append(f'<div class="objects">{len(item["objects"])} object(s): {e(listed)}</div>')
    chosen = (item.get("video") or {}).get("chosen")
    if chosen:
        lines.append(f'<div class="video">video: frame {int(chosen["index"])} at {float(chosen["time_s"]):.2f} s of '
                     f'{int(item["video"].get("frames_sampled") or 0)} sampled</div>')
    if item.get("segmenter"):
        rec = item.get("reconstructor") or "-"
        lines.append(f"<div>segmenter {e(item['segmenter'])} · reconstructor {e(rec)}</div>")
    if item.get("error"):
        err = item["error"]
        lines.append(f'<div class="error">{e(err.get("code", ""))}: {e(err.get("message", ""))}</div>')
    if "object.glb" in files:
        lines.append(f'<button type="button" data-open="{e(item["id"])}">View 3D / AR</button> '
                     f'<a href="{e(prefix)}/object.glb" download>GLB</a>')
    for index, rules in sorted((item.get("checks") or {}).items(), key=lambda kv: int(kv[0])):
        if rules:
            lines.append(_checks_table(index, rules))
    downloads = _downloads(files)
    if downloads:
        links = " ".join(f'<a href="{e(prefix)}/{e(name)}" download>{e(label)}</a>' for label, name in downloads)
        lines.append(f'<div class="downloads">{links}</div>')
    lines.append("</div>")
    return "\n".join(lines)


def render_gallery_html(index: dict[str, Any], *, viewer_available: bool = True) -> str:
    """The gallery page for a ``catalog.json`` document (links are relative to the output root).

    Args:
        index: the document built by ``catalog.build_index``.
        viewer_available: whether ``model-viewer.min.js`` is written next to the page; without it the page
            says how to install it and still links every GLB.

    Returns:
        A complete HTML document (UTF-8 text).
    """
    counts = index.get("counts", {})
    data = json.dumps({"items": index.get("items", [])}).replace("</", "<\\/")
    notice = "" if viewer_available else (
        '<p class="error">3D viewer not installed (run <code>make install</code>, which installs '
        f"{VIEWER_PACKAGE} from npm); the GLB links still work.</p>")
    notice += "".join(f'<p class="error">{html.escape(str(w))}</p>' for w in index.get("warnings", []))
    viewer_script = f'<script type="module" src="{VIEWER_FILE}"></script>' if viewer_available else ""
    cards = "\n".join(_card(item) for item in index.get("items", []))
    count_html = " ".join(f'<span>{html.escape(k)}: <b id="count-{html.escape(k)}">{v}</b></span>'
                          for k, v in counts.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sam3d-pipeline catalog</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>{_STYLE}</style>{viewer_script}</head>
<body>
<h1>Catalog: {len(index.get('items', []))} item(s)</h1>
<div>source <code>{html.escape(str(index.get('source', '')))}</code> ·
finished {html.escape(str(index.get('finished_at')))}</div>
<div class="counts">{count_html}</div>
{notice}
<div class="grid">
{cards}
</div>
<dialog id="viewer-dialog"><div id="viewer-title"></div>
<model-viewer id="viewer" camera-controls auto-rotate shadow-intensity="0.6" exposure="1.0"
  ar ar-modes="webxr scene-viewer quick-look" ar-placement="floor" alt="reconstructed object">
  <button slot="ar-button" id="ar-button">View in your space (AR)</button></model-viewer>
<button type="button" id="viewer-close">Close</button></dialog>
<script type="application/json" id="catalog-data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_gallery(storage: Storage, index: dict[str, Any]) -> str:
    """Write ``index.html`` (and ``model-viewer.min.js`` beside it when installed) at the output root.

    Returns:
        The URI of ``index.html``.
    """
    script = viewer_script_path()
    if script is not None:
        storage.write_bytes(VIEWER_FILE, script.read_bytes(), content_type="text/javascript")
    page = render_gallery_html(index, viewer_available=script is not None)
    return storage.write_bytes(GALLERY_FILE, page.encode(), content_type="text/html; charset=utf-8")
