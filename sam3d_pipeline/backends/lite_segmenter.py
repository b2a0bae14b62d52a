"""The ``lite`` segmenter: classical foreground segmentation with OpenCV's GrabCut, on the CPU.

It cannot read text. It finds the most distinct foreground region seeded by the box prompts, the click
prompts, or (with neither) a centre prior, and scores each connected region by how well it stands out
from its surroundings. The text prompt is recorded in reports but does not influence the result.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from ..masks import box_from_mask, clip_box
from ..settings import Settings
from ..types import BackendInfo, Box, Instance, Point, Segmentation, SegmentRequest

VERSION = "grabcut-1"
LIMITS = (
    "cannot read text prompts: the prompt is recorded but does not choose the object",
    "finds the most distinct foreground near the centre, inside a box, or around clicks",
    "scores are a colour/edge contrast heuristic in [0, 1], not calibrated probabilities",
)
GRABCUT_ITERATIONS = 5



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
            fg = self._grabcut(bgr, self._centre_seed(small.shape[:2], points))
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
