"""Meta's SAM 3 (``sam3==0.1.4``): segmenter, video tracker, CPU compatibility, assets,
click-decoder export and inputs, version. Importing this package imports neither torch nor sam3."""
