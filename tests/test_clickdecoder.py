"""The click decoder's prompt and mask rules (the Python reference for the review page's decoder)."""

from __future__ import annotations

import numpy as np
import pytest

from sam3d_pipeline.backends.sam3 import clickdecoder
from sam3d_pipeline.types import Point


def test_prompt_is_built_as_the_predictor_builds_it():
    clicks = [Point(10, 20, 1), Point(30, 40, 0)]
    plain = clickdecoder.prompt_inputs(clicks, None)
    assert plain["point_coords"].shape == (1, 3, 2) and plain["point_coords"].dtype == np.float32
    assert plain["point_labels"].tolist() == [[1, 0, -1]]
    boxed = clickdecoder.prompt_inputs(clicks, (1, 2, 50, 60))
    assert boxed["point_labels"].tolist() == [[2, 3, 1, 0, -1]]  # box corners first, padding point last
    assert boxed["point_coords"][0, :2].tolist() == [[1, 2], [50, 60]]
    assert clickdecoder.prompt_inputs([], (1, 2, 50, 60))["point_labels"].tolist() == [[2, 3, -1]]


def test_mask_choice_follows_the_decoders_stability_rule():
    iou = np.array([0.99, 0.2, 0.7, 0.5])
    stable = np.full((4, 288, 288), -5.0, np.float32)
    stable[0, 100:200, 100:200] = 5.0  # decisive logits: stability 1.0
    assert clickdecoder.choose_mask(stable, iou, 1, False) == 2  # one click: best multimask output
    assert clickdecoder.choose_mask(stable, iou, 2, False) == 0
    assert clickdecoder.choose_mask(stable, iou, 0, True) == 0
    unstable = stable.copy()
    unstable[0, :, :150] = 0.0  # a wide band within +-0.05 of the threshold
    assert clickdecoder.choose_mask(unstable, iou, 2, False) == 2


def test_small_background_regions_are_filled_large_ones_kept():
    logits = np.full((288, 288), 3.0, np.float32)
    logits[10:20, 10:20] = -1.0  # 100 px hole: filled
    logits[100:120, 100:120] = -1.0  # 400 px region: kept
    logits[0:5, 280:288] = -1.0  # 40 px on the border: filled too (any small background component)
    filled = clickdecoder.fill_holes(logits)
    assert (filled[10:20, 10:20] == 10.0).all() and (filled[0:5, 280:288] == 10.0).all()
    assert (filled[100:120, 100:120] == -1.0).all()
    assert (filled[logits > 0] == 3.0).all()


@pytest.mark.parametrize("size", [(400, 600), (37, 1001), (288, 288), (120, 90)])
def test_upsampling_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(sum(size))
    logits = rng.standard_normal((288, 288)).astype(np.float32)
    height, width = size
    ours = clickdecoder.upsample_mask(logits, width, height)
    ref = torch.nn.functional.interpolate(torch.from_numpy(logits)[None, None], size=(height, width),
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    assert ours.shape == (height, width) and ours.dtype == bool
    near = np.abs(ref) < 1e-5  # float rounding may flip values that sit on the threshold
    assert np.array_equal(ours[~near], (ref > 0)[~near])


def test_decoder_keys_are_per_model_version_and_safe():
    assert clickdecoder.decoder_key("sam3-0.1.4+random-init") == "_decoders/sam3-0.1.4+random-init/click-decoder.onnx"
    assert "/" not in clickdecoder.decoder_key("a/../b").split("/", 1)[1].rsplit("/", 1)[0]
    assert clickdecoder.embeddings_key("photo-abc") == "photo-abc/review/embeddings.bin"


def test_float32_decoder_has_its_own_key_and_unknown_weights_are_refused():
    uint8 = clickdecoder.decoder_key("sam3-0.1.4")
    assert clickdecoder.decoder_key("sam3-0.1.4", "float32") == "_decoders/sam3-0.1.4/click-decoder-float32.onnx"
    assert clickdecoder.decoder_key("sam3-0.1.4", "uint8") == uint8 != clickdecoder.decoder_key("sam3-0.1.4", "float32")
    with pytest.raises(ValueError, match="float16"):
        clickdecoder.decoder_key("sam3-0.1.4", "float16")


def test_segmenters_without_a_click_decoder_store_nothing(tmp_path):
    from sam3d_pipeline.backends.lite_segmenter import LiteSegmenter
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.storage import LocalStorage

    storage = LocalStorage(str(tmp_path))
    rgb = np.zeros((20, 30, 3), np.uint8)
    assert clickdecoder.publish_review_assets(LiteSegmenter(Settings()), rgb, storage, "p") is None
    assert not any(tmp_path.iterdir())
