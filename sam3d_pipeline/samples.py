"""Sample photos shipped by installed packages (used by ``make demo`` and the tests)."""

from __future__ import annotations

import sys
from pathlib import Path

# scikit-image ships these in its wheel. coffee.png: 600x400, CC0 (photo by Rachel Michetti, courtesy of
# Pikolo Espresso Bar), see skimage.data.coffee.
SAMPLES = {
    "coffee": ("coffee.png", "coffee cup"),
    "chelsea": ("chelsea.png", "cat"),
    "rocket": ("rocket.jpg", "rocket"),
}


def sample_path(name: str = "coffee") -> Path:
    """Path of a sample photo inside the installed scikit-image package."""
    import skimage.data

    filename = SAMPLES[name][0]
    path = Path(skimage.data.__file__).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"sample {name!r} not found at {path}; reinstall scikit-image")
    return path


if __name__ == "__main__":
    print(sample_path(sys.argv[1] if len(sys.argv) > 1 else "coffee"))
