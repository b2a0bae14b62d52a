"""Write the studio viewer's light: ``sam3d_pipeline/web/static/studio/light.png``.

A 64 x 32 equirectangular image (grey, 8-bit): a bright top, a darker floor and three soft panels a little above
the horizon (front left, front right, behind). ``<model-viewer>`` lights the object with it
(``environment-image``) instead of its generated "neutral" room: in Chromium's software WebGL (a browser
without a GPU), prefiltering that room takes about 3 of the 4 seconds of the viewer's first render, and this
image's about a tenth of that. Diffuse lighting needs only its low frequencies, so 64 x 32 is enough; the page
raises ``exposure`` to match the neutral room's brightness (the room's exposure compensation applies to it only).

Usage: python tools/studio_light.py   (rewrites the file; ``tests/test_studio_light.py`` checks it matches)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

TARGET = Path(__file__).resolve().parents[1] / "sam3d_pipeline" / "web" / "static" / "studio" / "light.png"
WIDTH, HEIGHT = 64, 32
PANELS = (-0.7, 0.7, np.pi)  # longitudes (radians) of the soft panels, 0.35 rad above the horizon


def light_png() -> bytes:
    lat = (0.5 - (np.arange(HEIGHT) + 0.5) / HEIGHT) * np.pi
    lon = (np.arange(WIDTH) + 0.5) / WIDTH * 2 * np.pi - np.pi
    lon_grid, lat_grid = np.meshgrid(lon, lat)
    value = 0.8 + 0.2 * np.clip(np.sin(lat_grid), 0, 1) - 0.35 * np.clip(-np.sin(lat_grid), 0, 1)
    for centre in PANELS:
        distance = np.hypot((lon_grid - centre) / 0.45, (lat_grid - 0.35) / 0.3)
        value = value + 0.25 * np.exp(-distance**2)
    grey = (np.clip(value, 0, 1) * 255).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(grey, mode="L").save(out, format="PNG", optimize=True)
    return out.getvalue()


if __name__ == "__main__":
    TARGET.write_bytes(light_png())
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes)")
