"""The studio viewer's light image is the one ``tools/studio_light.py`` makes, and the studio page uses it."""

import runpy
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STUDIO = ROOT / "sam3d_pipeline" / "web" / "static" / "studio"


def test_the_light_image_is_what_its_generator_writes_and_the_viewer_uses_it():
    tool = runpy.run_path(str(ROOT / "tools" / "studio_light.py"))
    assert (STUDIO / "light.png").read_bytes() == tool["light_png"]()
    with Image.open(STUDIO / "light.png") as image:
        assert image.size == (64, 32)  # equirectangular: width twice the height
        low, high = image.getextrema()
        assert 100 < low < high == 255  # a lit top, a darker floor
    assert 'environment-image="/studio/light.png"' in (STUDIO / "index.html").read_text()
