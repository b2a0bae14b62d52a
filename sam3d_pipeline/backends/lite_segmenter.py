"""The ``lite`` segmenter: classical foreground segmentation with OpenCV's GrabCut, on the CPU.

It cannot read text. It finds the most distinct foreground region seeded by the box prompts, the click
prompts, or (with neither) a centre prior, and scores each connected region by how well it stands out
from its surroundings. On a plain background (most of the photo's border one colour: a backdrop, a table)
the seed without boxes is every pixel unlike that colour instead of the centre prior, so every object of the
scene is found, also near or cut by the photo's edge. The text prompt is recorded in reports but does not
influence the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

from sam3d_pipeline.masks import box_from_mask, clip_box
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, Box, Instance, Point, Segmentation, SegmentRequest, Track

VERSION = "grabcut-1"
LIMITS = (
    "cannot read text prompts: the prompt is recorded but does not choose the object",
    "finds the most distinct foreground near the centre, inside a box, or around clicks",
    "scores are a colour/edge contrast heuristic in [0, 1], not calibrated probabilities",
    "video: per-frame GrabCut seeded by the previous frame's mask, no motion model; a lost object is searched for "
    "again by its last seen colours only (a similar-coloured thing elsewhere can be taken for it)",
)
GRABCUT_ITERATIONS = 5
GRABCUT_SEED = 0  # OpenCV's generator before each GrabCut: 0 is its default state, as in a fresh process
# Tracking: a frame's mask must keep at least this share of the previous frame's area, and at most this multiple,
# to count as the same object (a sudden collapse or a spill into the background means the object was lost).
TRACK_MIN_AREA_RATIO = 0.3
TRACK_MAX_AREA_RATIO = 2.5
# Plain background: at least this share of the border band lies within PLAIN_CLOSE_DE (CIELAB ΔE) of the border's
# median colour; a pixel is probably an object beyond max(PLAIN_MIN_DE, PLAIN_SPREAD x the band's median ΔE).
PLAIN_BORDER_SHARE = 0.75
PLAIN_CLOSE_DE = 10.0
PLAIN_MIN_DE = 12.0
PLAIN_SPREAD = 3.0


def describe(settings: Settings | None = None) -> BackendInfo:
    """This backend's ``BackendInfo`` (the same for every settings: a classical algorithm on the CPU)."""
    return BackendInfo(name="lite", version=VERSION, device="cpu", limits=LIMITS, weights="none")

class LiteSegmenter:
    """GrabCut-based segmenter (see module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def info(self) -> BackendInfo:
        return describe(self.settings)

    def segment(self, rgb: np.ndarray, request: SegmentRequest) -> Segmentation:
        """Segment ``rgb`` (``(H, W, 3)`` uint8).

        One GrabCut run per box (each yields at most one instance), or one run seeded by the clicks and a
        centre prior (each sufficiently large connected region becomes an instance).
        """
        height, width = rgb.shape[:2]
        scale = min(1.0, self.settings.lite_work_size_px / max(height, width))
        small = rgb if scale == 1.0 else cv2.resize(
            rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
        messages = [f"lite segmenter cannot read text; prompt {request.prompt!r} recorded, not used"]
        if float(small.reshape(-1, 3).std(axis=0).max()) < 2.0:
            messages.append("image is uniform: no foreground to separate")
            return Segmentation([], self.info(), used_text_prompt=False, messages=messages)

        bgr = np.ascontiguousarray(small[..., ::-1])
        lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float32)
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
        gradient = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
        points = [Point(p.x * scale, p.y * scale, p.label) for p in request.points]

        regions: list[np.ndarray] = []
        if request.boxes:
            for box in request.boxes:
                b = Box(box.x0 * scale, box.y0 * scale, box.x1 * scale, box.y1 * scale)
                fg = self._grabcut(bgr, self._box_seed(small.shape[:2], b, points))
                comps = self._components(fg, points)
                if comps:
                    regions.append(max(comps, key=lambda c: int(c.sum())))
        elif request.prior_mask is not None:
            prior = cv2.resize(request.prior_mask.astype(np.uint8), small.shape[1::-1],
                               interpolation=cv2.INTER_NEAREST) > 0
            fg = self._grabcut(bgr, self._prior_seed(prior, points))
            regions = self._components(fg, points)
        else:
            plain = plain_background_distance(lab)
            if plain is not None:
                messages.append("plain background: every region unlike it is a candidate object")
                seed = self._plain_seed(*plain, points)
            else:
                seed = self._centre_seed(small.shape[:2], points)
            fg = self._grabcut(bgr, seed)
            regions = self._components(fg, points)

        instances = []
        min_area = self.settings.min_instance_area_fraction * small.shape[0] * small.shape[1]
        for region in regions:
            if region.sum() < max(min_area, 4):
                continue
            score = region_score(lab, gradient, region)
            if score < self.settings.score_threshold:
                messages.append(f"dropped a region scoring {score:.2f} (< {self.settings.score_threshold})")
                continue
            full = region if scale == 1.0 else cv2.resize(
                region.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR
            ) > 127
            if not full.any():
                continue
            instances.append(Instance(mask=full, box=clip_box(box_from_mask(full), width, height), score=score))
        instances.sort(key=lambda inst: inst.score, reverse=True)
        if not instances:
            messages.append("no region stands out from its surroundings")
        return Segmentation(instances, self.info(), used_text_prompt=False, messages=messages)

    def track(self, frames: Sequence[np.ndarray], request: SegmentRequest) -> Track:
        """Follow one object through ``frames`` (each ``(H, W, 3)`` uint8): GrabCut per frame, seeded by the
        previous frame's mask.

        The first frame (and every frame after the object is lost) is segmented as a photo: boxes and clicks on
        the first frame, the centre prior later; its best instance starts (or restarts) the track.

        Returns:
            One mask (all False where not found) and one ``region_score`` per frame.
        """
        masks: list[np.ndarray] = []
        scores: list[float] = []
        messages = [f"lite tracker cannot read text; prompt {request.prompt!r} recorded, not used"]
        previous: np.ndarray | None = None
        looks: tuple[np.ndarray, np.ndarray, int] | None = None  # last seen colour (Lab mean, std) and area
        found_at: int | None = None
        for position, rgb in enumerate(frames):
            mask, score = (self._follow(rgb, previous) if previous is not None else (None, 0.0))
            if previous is not None and mask is None:
                messages.append(f"lost the object at sampled frame {position}; searching again")
            if mask is None and looks is not None:
                candidate = _by_colour(rgb, *looks)
                if candidate is not None:
                    mask, score = self._follow(rgb, candidate)
                    if mask is not None:
                        messages.append(f"found the object again at sampled frame {position} by its colours")
            if mask is None and found_at is None:
                seg = self.segment(rgb, request if position == 0 else SegmentRequest(prompt=request.prompt))
                if seg.instances:
                    mask, score = seg.instances[0].mask, seg.instances[0].score
            if mask is None:
                mask, score = np.zeros(rgb.shape[:2], bool), 0.0
            else:
                found_at = position if found_at is None else found_at
                if not _touches_border(mask):  # a part cut off by the frame's edge is no portrait of the object
                    looks = _appearance(rgb, mask)
            masks.append(mask)
            scores.append(float(score))
            previous = mask if mask.any() else None
        if found_at is None:
            messages.append("no region stands out in any sampled frame")
        return Track(masks, scores, self.info(), used_text_prompt=False, found_at=found_at, messages=messages)

    def _follow(self, rgb: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray | None, float]:
        """The object in ``rgb`` near its mask ``previous`` (``(H, W)`` bool), or ``(None, 0.0)`` when lost."""
        height, width = rgb.shape[:2]
        scale = min(1.0, self.settings.lite_work_size_px / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = rgb if scale == 1.0 else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        prior = previous if scale == 1.0 else cv2.resize(previous.astype(np.uint8), size,
                                                         interpolation=cv2.INTER_NEAREST) > 0
        area = int(prior.sum())
        if area < 4:
            return None, 0.0
        margin = max(3, round(np.sqrt(area) * 0.25))
        near = cv2.dilate(prior.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                                            (2 * margin + 1, 2 * margin + 1))) > 0
        far = cv2.dilate(near.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                                          (6 * margin + 1, 6 * margin + 1))) > 0
        seed = np.full(prior.shape, cv2.GC_BGD, np.uint8)
        seed[far] = cv2.GC_PR_BGD
        seed[near] = cv2.GC_PR_FGD
        bgr = np.ascontiguousarray(small[..., ::-1])
        fg = self._grabcut(bgr, seed) & near
        regions = self._components(fg, [])
        if not regions:
            return None, 0.0
        region = max(regions, key=lambda r: int((r & prior).sum()))
        if not (TRACK_MIN_AREA_RATIO * area <= region.sum() <= TRACK_MAX_AREA_RATIO * area):
            return None, 0.0
        lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float32)
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
        gradient = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
        score = region_score(lab, gradient, region)
        if score < self.settings.score_threshold:
            return None, 0.0
        full = region if scale == 1.0 else cv2.resize(region.astype(np.uint8) * 255, (width, height),
                                                       interpolation=cv2.INTER_LINEAR) > 127
        return (full, score) if full.any() else (None, 0.0)

    # Seeds -------------------------------------------------------------------------------------------

    @staticmethod
    def _click_radius(shape: tuple[int, int]) -> int:
        return max(2, round(min(shape) * 0.015))

    def _apply_points(self, seed: np.ndarray, points: list[Point]) -> None:
        r = self._click_radius(seed.shape)
        for p in points:
            value = cv2.GC_FGD if p.label == 1 else cv2.GC_BGD
            cv2.circle(seed, (round(p.x), round(p.y)), r, int(value), -1)

    def _box_seed(self, shape: tuple[int, int], box: Box, points: list[Point]) -> np.ndarray:
        h, w = shape
        seed = np.full((h, w), cv2.GC_BGD, np.uint8)
        x0, y0, x1, y1 = (int(round(v)) for v in clip_box(box.as_tuple(), w, h))
        seed[y0:y1, x0:x1] = cv2.GC_PR_FGD
        if (seed != cv2.GC_BGD).all():  # box covers the whole image: let the border be probable background
            seed[[0, -1], :] = cv2.GC_PR_BGD
            seed[:, [0, -1]] = cv2.GC_PR_BGD
        self._apply_points(seed, points)
        return seed

    def _centre_seed(self, shape: tuple[int, int], points: list[Point]) -> np.ndarray:
        h, w = shape
        seed = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
        cv2.ellipse(seed, (w // 2, h // 2), (max(1, int(w * 0.3)), max(1, int(h * 0.3))), 0, 0, 360,
                    int(cv2.GC_PR_FGD), -1)
        band = max(2, round(min(h, w) * 0.03))
        seed[:band, :] = cv2.GC_BGD
        seed[-band:, :] = cv2.GC_BGD
        seed[:, :band] = cv2.GC_BGD
        seed[:, -band:] = cv2.GC_BGD
        self._apply_points(seed, points)
        return seed

    def _plain_seed(self, distance: np.ndarray, threshold: float, points: list[Point]) -> np.ndarray:
        """Plain background: pixels far from its colour are probable foreground, near ones sure background."""
        seed = np.where(distance > threshold, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        seed[distance < threshold / 2] = cv2.GC_BGD
        self._apply_points(seed, points)
        return seed

    def _prior_seed(self, prior: np.ndarray, points: list[Point]) -> np.ndarray:
        """Refinement: the earlier mask is probable foreground, the rest probable background, clicks are sure."""
        seed = np.where(prior, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        band = max(2, round(min(prior.shape) * 0.03))
        border = np.ones_like(prior)
        border[band:-band, band:-band] = False
        seed[border & ~prior] = cv2.GC_BGD
        self._apply_points(seed, points)
        return seed

    @staticmethod
    def _grabcut(bgr: np.ndarray, seed: np.ndarray) -> np.ndarray:
        fg_seed = np.isin(seed, (cv2.GC_FGD, cv2.GC_PR_FGD))
        bg_seed = np.isin(seed, (cv2.GC_BGD, cv2.GC_PR_BGD))
        if not fg_seed.any() or not bg_seed.any():
            return fg_seed
        mask = seed.copy()
        bgd_model = np.zeros((1, 65), np.float64)
        fgd_model = np.zeros((1, 65), np.float64)
        # GrabCut seeds its colour models with k-means on OpenCV's per-thread random generator: seed it, so the
        # same photo and prompt give the same mask whatever ran before in this process (deterministic outputs).
        cv2.setRNGSeed(GRABCUT_SEED)
        cv2.grabCut(bgr, mask, None, bgd_model, fgd_model, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
        return np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD))

    def _components(self, fg: np.ndarray, points: list[Point]) -> list[np.ndarray]:
        """Clean the foreground and split it into connected regions (those holding a positive click first)."""
        k = max(3, round(min(fg.shape) * 0.01) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        clean = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, kernel)
        clean = cv2.morphologyEx(clean, cv2.MORPH_CLOSE, kernel)
        clean = ndimage.binary_fill_holes(clean)
        count, labels = cv2.connectedComponents(clean.astype(np.uint8), connectivity=8)
        regions = [labels == i for i in range(1, count)]
        positives = [p for p in points if p.label == 1]
        if positives:
            h, w = fg.shape
            hit = [
                r for r in regions
                if any(r[min(h - 1, max(0, round(p.y))), min(w - 1, max(0, round(p.x)))] for p in positives)
            ]
            if hit:
                return hit
        return regions


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _appearance(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The object's colour in CIELAB (mean, standard deviation per channel) and its area in pixels."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2LAB).astype(np.float32)[mask]
    return lab.mean(0), lab.std(0) + 4.0, int(mask.sum())


def _by_colour(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray, area: int) -> np.ndarray | None:
    """The largest region coloured like the lost object (within 2.5 standard deviations), when it is big enough
    (a tenth of its last area) to seed the tracker again; None when nothing is."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2LAB).astype(np.float32)
    close = (np.abs(lab - mean) / std).max(axis=-1) < 2.5
    count, labels, stats, _ = cv2.connectedComponentsWithStats(close.astype(np.uint8), connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best if stats[best, cv2.CC_STAT_AREA] >= max(8, area // 10) else None


def plain_background_distance(lab: np.ndarray) -> tuple[np.ndarray, float] | None:
    """When the photo's background is plain, ``(each pixel's CIELAB ΔE from it (H, W), the ΔE beyond which a
    pixel is probably an object)``; None otherwise.

    Plain: at least ``PLAIN_BORDER_SHARE`` of a border band 3% of the short side wide lies within
    ``PLAIN_CLOSE_DE`` of the band's median colour (objects cut by the edge may take the rest).
    """
    h, w = lab.shape[:2]
    band = max(2, round(min(h, w) * 0.03))
    border = np.ones((h, w), bool)
    border[band:-band, band:-band] = False
    colour = np.median(lab[border], axis=0)
    distance = np.linalg.norm(lab - colour, axis=-1)
    near = distance[border]
    close = near < PLAIN_CLOSE_DE
    if close.mean() < PLAIN_BORDER_SHARE:
        return None
    return distance, max(PLAIN_MIN_DE, PLAIN_SPREAD * float(np.median(near[close])))


def region_score(lab: np.ndarray, gradient: np.ndarray, region: np.ndarray) -> float:
    """How much ``region`` stands out: colour contrast with a ring around it and edge strength on its outline.

    Args:
        lab: ``(H, W, 3)`` float32 CIELAB image.
        gradient: ``(H, W)`` float32 gradient magnitude.
        region: ``(H, W)`` bool.

    Returns:
        A heuristic in [0, 1]: 0.6 x colour separation + 0.4 x edge strength, scaled down by the share of
        the outline that runs along the image border (a region bounded by the frame is likely background).
    """
    h, w = region.shape
    size = float(np.sqrt(region.sum()))
    k = max(3, int(size * 0.15) | 1)
    ring = cv2.dilate(region.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
    ring &= ~region
    if ring.sum() < 4:
        return 0.0
    inside, outside = lab[region], lab[ring]
    fisher = float(((inside.mean(0) - outside.mean(0)) ** 2).sum() / (inside.var(0).sum() + outside.var(0).sum() + 1.0))
    contrast = 1.0 - float(np.exp(-2.0 * fisher))
    outline = region & ~(cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    edge_ratio = float(gradient[outline].mean() / (gradient.mean() + 1e-6)) if outline.any() else 0.0
    edges = 1.0 - float(np.exp(-0.5 * max(0.0, edge_ratio - 1.0)))
    border = np.zeros_like(region)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    border_share = float((outline & border).sum() / max(1, outline.sum()))
    return float(np.clip((0.6 * contrast + 0.4 * edges) * (1.0 - border_share), 0.0, 1.0))
