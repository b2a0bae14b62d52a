"""Review page in headless Chromium: open → first mask, click → mask (median, p95), bytes per additional image.

Starts its own Prefect test server, two `image-to-3d` runs paused for review (review=required) on two sample
photos, the review server and Debian's Chromium (one browser profile, as a reviewer going from one photo to
the next); everything is stopped at the end.

``--segmenter sam3`` (the default when sam3 is installed; random weights on this CPU) measures the in-browser
decoder (onnxruntime-web), then the same clicks with onnxruntime in Python on the same decoder file and
embeddings (native baseline, and the browser mask checked against it), and the decoder's fidelity: masks from
the page's decoder (uint8 weights, or float32 with ``--decoder-weights float32``) on the stored 6-bit
embeddings (what the page runs) against the float32 decoder on float32 features, and each compression alone.
``--segmenter lite`` measures the server-side refinement fallback.

Usage: python bench/review_latency.py [--segmenter sam3|lite] [--clicks 50]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "bench-token"
PHOTOS = ("coffee", "chelsea")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q))


def click_plan(n: int, width: int, height: int) -> list[list[tuple[float, float, int]]]:
    """Click sequences as the page accumulates them: a new set every 10 clicks (the page's Reset)."""
    rng = np.random.default_rng(7)
    plans, current = [], []
    for i in range(n):
        if i % 10 == 0:
            current = []
        x = float(round(rng.uniform(0.3, 0.7) * width))
        y = float(round(rng.uniform(0.3, 0.7) * height))
        current = current + [(x, y, 0 if (i % 10) in (3, 7) else 1)]
        plans.append(current)
    return plans


def start_paused_runs(out: str, segmenter: str) -> list:
    from prefect import tags
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline.samples import sample_path

    runs = []
    for name in PHOTOS:
        tag = f"review-bench-{name}"

        def run_flow(name=name, tag=tag):
            with tags(tag):
                image_to_3d(image=str(sample_path(name)), prompt="object", output_root=out, review="required",
                            review_timeout_s=1800, segmenter=segmenter, reconstructor="lite", force=True,
                            return_state=True)

        thread = threading.Thread(target=run_flow, daemon=True)
        thread.start()
        with get_client(sync_client=True) as client:
            while True:
                found = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
                if found and found[0].state.is_paused():
                    runs.append((found[0].id, thread))
                    break
                if not thread.is_alive():
                    raise RuntimeError(f"the {name} run ended without pausing")
                time.sleep(0.3)
        time.sleep(1.0)  # the pause's input schema is saved just after the state changes
    return runs


def open_page(context, url: str) -> dict:
    """Open a run's page; return timings and the bytes that came over the network (not from a cache)."""
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    transferred = {"bytes": 0}
    cdp.on("Network.loadingFinished", lambda e: transferred.__setitem__("bytes", transferred["bytes"]
                                                                           + int(e["encodedDataLength"])))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    opened = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    first_mask_s = time.perf_counter() - opened
    page.wait_for_selector("body[data-decoder]", timeout=120_000)
    ready_s = time.perf_counter() - opened
    time.sleep(0.5)  # let the last responses finish before counting
    # When the frame with the first mask was painted, from the start of navigation (the page's own clock);
    # the driver's own observation can lag behind while the page's main thread loads the decoder.
    in_page_s = float(page.get_attribute("body", "data-first-mask-ms")) / 1000
    return {"page": page, "first_mask_s": first_mask_s, "first_mask_in_page_s": in_page_s,
            "decoder_ready_s": ready_s, "bytes": transferred["bytes"],
            "decoder": page.get_attribute("body", "data-decoder"), "label": page.inner_text("#decoder"),
            "errors": errors}


def run_clicks(page, plans, width: int) -> list[dict]:
    canvas = page.locator("#canvas")
    for i, plan in enumerate(plans):
        if len(plan) == 1 and i:
            page.click("#reset")
        x, y, label = plan[-1]
        scale = canvas.bounding_box()["width"] / width
        canvas.click(position={"x": (x + 0.5) * scale, "y": (y + 0.5) * scale}, modifiers=[] if label else ["Shift"])
        page.wait_for_function(f"window.reviewClicks.length >= {i + 1}", timeout=120_000)
    return page.evaluate("window.reviewClicks")


def native_and_fidelity(out: str, run_prefix: Path, decoder_key: str, plans, shown: np.ndarray,
                        browser_low: np.ndarray, width: int, height: int, rgb: np.ndarray) -> dict:
    """onnxruntime in Python on the page's files; and the page's masks against float32+float32 masks."""
    from sam3d_pipeline.backends.sam3 import clickdecoder, embeddings
    from sam3d_pipeline.backends.sam3.onnx_export import export
    from sam3d_pipeline.backends.sam3.segmenter import Sam3Segmenter
    from sam3d_pipeline.settings import get_settings
    from sam3d_pipeline.types import Point

    stored = embeddings.decode((run_prefix / "review" / "embeddings.bin").read_bytes())
    figures: dict = {}
    for threads in (1, 2):
        decoder = clickdecoder.OnnxClickDecoder(Path(out) / decoder_key, threads=threads)
        times = []
        for plan in plans:
            t = time.perf_counter()
            mask, _ = decoder.decode(stored, [Point(*p) for p in plan], None, width, height)
            times.append((time.perf_counter() - t) * 1000)
        figures[f"native_{threads}t_median_ms"] = round(statistics.median(times), 1)
        figures[f"native_{threads}t_p95_ms"] = round(pct(times, 95), 1)
    low, _ = decoder.raw(stored, [Point(*p) for p in plans[-1]], None, width, height)
    figures["browser_vs_native_last_mask_iou"] = round(embeddings.mask_iou(shown, mask), 5)
    figures["browser_vs_native_pixels_differing"] = int((shown != mask).sum())
    figures["browser_vs_native_max_logit_diff"] = round(float(np.abs(browser_low.reshape(low.shape) - low).max()), 5)

    segmenter = Sam3Segmenter(get_settings())
    exact = segmenter.embeddings(rgb)
    with tempfile.TemporaryDirectory() as tmp:
        report = export(segmenter.loaded.model, Path(tmp) / "decoder.onnx", quantize=True)
        float_decoder = clickdecoder.OnnxClickDecoder(Path(report["path"]))
        page_decoder = clickdecoder.OnnxClickDecoder(Path(out) / decoder_key)
        ious, torch_ious, same_output, flips = [], [], [], 0
        decoder_only, embeddings_only = [], []  # which of the two compressions costs the fidelity
        for plan in plans:
            points = [Point(*p) for p in plan]
            ref, _ = float_decoder.decode(exact, points, None, width, height)
            got, _ = page_decoder.decode(stored, points, None, width, height)
            ious.append(embeddings.mask_iou(ref, got))
            decoder_only.append(embeddings.mask_iou(ref, page_decoder.decode(exact, points, None, width, height)[0]))
            embeddings_only.append(
                embeddings.mask_iou(ref, float_decoder.decode(stored, points, None, width, height)[0]))
            # The same output index on both sides: the decoder's numerical fidelity without the discrete choice
            # (the stability rule can pick another output when mask 0 sits at its 0.98 threshold).
            f_low, f_iou = float_decoder.raw(exact, points, None, width, height)
            p_low, p_iou = page_decoder.raw(stored, points, None, width, height)
            index = clickdecoder.choose_mask(f_low[0], f_iou[0], len(points), False)
            flips += index != clickdecoder.choose_mask(p_low[0], p_iou[0], len(points), False)
            same_output.append(embeddings.mask_iou(*(
                clickdecoder.upsample_mask(clickdecoder.fill_holes(low[0, index]), width, height)
                for low in (f_low, p_low))))
            predicted, _, _ = segmenter.click(rgb, points)  # SAM 3's own predict_inst, float32 features
            torch_ious.append(embeddings.mask_iou(predicted, ref))
    figures |= {"page_vs_float_mask_iou_mean": round(float(np.mean(ious)), 4),
                "page_vs_float_mask_iou_min": round(float(np.min(ious)), 4),
                "page_vs_float_same_output_iou_mean": round(float(np.mean(same_output)), 4),
                "page_vs_float_same_output_iou_min": round(float(np.min(same_output)), 4),
                "page_vs_float_output_choice_differs": int(flips),
                "page_decoder_on_float_features_iou_mean": round(float(np.mean(decoder_only)), 4),
                "float_decoder_on_stored_embeddings_iou_mean": round(float(np.mean(embeddings_only)), 4),
                "float_onnx_vs_predict_inst_iou_mean": round(float(np.mean(torch_ious)), 4),
                "float_onnx_vs_predict_inst_iou_min": round(float(np.min(torch_ious)), 4),
                "decoder_bytes": int(report["quant_size_bytes"]), "float_decoder_bytes": int(report["size_bytes"])}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="clicks measured but left out of the figures")
    parser.add_argument("--segmenter", choices=["sam3", "lite"],
                        default="sam3" if importlib.util.find_spec("sam3") else "lite")
    parser.add_argument("--decoder-weights", choices=["uint8", "float32"], default="uint8",
                        help="SAM3D_REVIEW_DECODER_WEIGHTS: the in-browser decoder's weights")
    args = parser.parse_args()
    os.environ["SAM3D_REVIEW_DECODER_WEIGHTS"] = args.decoder_weights
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ |= {"PREFECT_LOGGING_LEVEL": "WARNING",  # paused runs poll at the default interval (5 s)
                   "SAM3D_SAM3_RANDOM_INIT": "true", "SAM3D_SAM3_CONFIDENCE_THRESHOLD": "0"}
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from sam3d_pipeline.samples import sample_path
    from tests.servers import free_port, wait_for_port

    rgb = np.asarray(Image.open(sample_path(PHOTOS[0])).convert("RGB"))
    height, width = rgb.shape[:2]
    plans = click_plan(args.warmup + args.clicks, width, height)
    with prefect_test_harness(server_startup_timeout=120), tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        runs = start_paused_runs(out, args.segmenter)
        print(f"two runs paused for review after {time.perf_counter() - started:.0f} s ({args.segmenter})")
        port = free_port()
        env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "SAM3D_REVIEW_TOKEN": TOKEN}
        server = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "review-server", "--port", str(port)],
                                  env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
        try:
            wait_for_port(port, proc=server)
            with sync_playwright() as pw:
                # A persistent profile, like a reviewer's browser: its disk cache keeps the 14 MB wasm runtime
                # (an off-the-record context's memory cache does not keep entries that large).
                profile = tempfile.mkdtemp(prefix="sam3d-bench-profile-")
                context = pw.chromium.launch_persistent_context(
                    profile, executable_path="/usr/bin/chromium",
                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run"],
                )
                first = open_page(context, f"http://127.0.0.1:{port}/runs/{runs[0][0]}#token={TOKEN}")
                info = first["page"].evaluate(f"""fetch('/api/runs/{runs[0][0]}', {{headers: {{Authorization:
                    'Bearer {TOKEN}'}}}}).then(r => r.json())""")
                clicks = run_clicks(first["page"], plans, width)
                shown = np.array(first["page"].evaluate("Array.from(window.reviewState.mask)"), bool)
                browser_low = np.array(first["page"].evaluate(
                    "window.reviewState.decoder ? Array.from(window.reviewState.decoder.lastOutput.lowRes) : []"),
                    np.float32)
                threads = first["page"].get_attribute("body", "data-decoder-threads")
                second = open_page(context, f"http://127.0.0.1:{port}/runs/{runs[1][0]}#token={TOKEN}")
                errors = first["errors"] + second["errors"]
                context.close()
            run_prefix = Path(out) / info["prefix"]
            extra = {}
            if first["decoder"] == "onnx-web":
                extra = native_and_fidelity(out, run_prefix, info["decoder_cache_key"], plans[args.warmup:],
                                            shown.reshape(height, width), browser_low, width, height, rgb)
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
            for run_id, thread in runs:
                resume_flow_run(run_id, run_input={"action": "reject"})
                thread.join(60)
    measured = clicks[args.warmup:]
    total = [c["totalMs"] for c in measured]
    decode = [c["decodeMs"] for c in measured]
    figures = {
        "click_path": first["decoder"], "photo": f"{width}x{height}", "wasm_threads": threads,
        "first_mask_s": round(first["first_mask_s"], 2),
        "first_mask_from_navigation_s": round(first["first_mask_in_page_s"], 2),
        "decoder_ready_s": round(first["decoder_ready_s"], 2),
        "second_image_first_mask_s": round(second["first_mask_s"], 2),
        "second_image_first_mask_from_navigation_s": round(second["first_mask_in_page_s"], 2),
        "second_image_decoder_ready_s": round(second["decoder_ready_s"], 2),
        "clicks": len(total), "click_median_ms": round(statistics.median(total), 1),
        "click_p95_ms": round(pct(total, 95), 1), "decode_median_ms": round(statistics.median(decode), 1),
        "first_page_bytes": first["bytes"], "bytes_per_additional_image": second["bytes"],
        "page_errors": len(errors),
    } | extra
    print(f"machine: {os.cpu_count()} cores; photo {width}x{height}; click path: {first['label']}")
    print(f"open → first mask painted: {figures['first_mask_from_navigation_s']} s from navigation start "
          f"(seen by the driver at {figures['first_mask_s']} s; decoder ready {figures['decoder_ready_s']} s); "
          f"next photo: {figures['second_image_first_mask_from_navigation_s']} s "
          f"(ready {figures['second_image_decoder_ready_s']} s)")
    print(f"click → mask over {len(total)} clicks after {args.warmup} warm-up: median {figures['click_median_ms']} ms, "
          f"p95 {figures['click_p95_ms']} ms (decoder alone: median {figures['decode_median_ms']} ms)")
    print(f"bytes over the network: first page {figures['first_page_bytes']:,}; "
          f"each additional image {figures['bytes_per_additional_image']:,}")
    if extra:
        print(f"native onnxruntime: 1 thread median {extra['native_1t_median_ms']} ms, 2 threads median "
              f"{extra['native_2t_median_ms']} ms; browser/native(2 threads) = "
              f"{figures['click_median_ms'] / extra['native_2t_median_ms']:.2f}x")
        print(f"browser vs onnxruntime in Python (last click): largest logit difference "
              f"{extra['browser_vs_native_max_logit_diff']}; mask IoU {extra['browser_vs_native_last_mask_iou']}, "
              f"{extra['browser_vs_native_pixels_differing']} pixels differ")
        print(f"page decoder ({args.decoder_weights}, 6-bit embeddings) vs float32: mask IoU mean "
              f"{extra['page_vs_float_mask_iou_mean']}, min {extra['page_vs_float_mask_iou_min']} "
              f"({extra['page_vs_float_output_choice_differs']} clicks chose another output; same output: mean "
              f"{extra['page_vs_float_same_output_iou_mean']}, min {extra['page_vs_float_same_output_iou_min']}); "
              f"{args.decoder_weights} decoder alone {extra['page_decoder_on_float_features_iou_mean']}, "
              f"6-bit embeddings alone {extra['float_decoder_on_stored_embeddings_iou_mean']}; "
              f"float32 ONNX "
              f"vs SAM 3's predict_inst: mean {extra['float_onnx_vs_predict_inst_iou_mean']}, "
              f"min {extra['float_onnx_vs_predict_inst_iou_min']}")
    if errors:
        print(f"page errors: {errors}")
    name = f"review_page_{args.segmenter}" + ("_float32" if args.decoder_weights == "float32" else "")
    print("BENCH_JSON " + json.dumps({name: figures | {"decoder_weights": args.decoder_weights}}))


if __name__ == "__main__":
    main()
