// In-browser click decoder: SAM 3's prompt encoder + mask decoder exported to ONNX, run with onnxruntime-web.
//
// The page downloads the decoder once per model version and, per image, the compact embeddings
// (``embeddings.bin``, format S3DE: see sam3d_pipeline/backends/sam3/embeddings.py). Every click is decoded here, with no
// server round trip. The prompt and mask rules follow SAM 3's interactive predictor (predict_inst) and are
// the same as sam3d_pipeline/backends/sam3/clickdecoder.py (the Python reference the tests compare against).
import * as ort from "/static/ort/ort.wasm.min.mjs";

const LOW_RES = 288;
const STABILITY_DELTA = 0.05;  // the tracker's MaskDecoder (dynamic multimask via stability)
const STABILITY_THRESH = 0.98;
const MAX_HOLE_AREA = 256;  // SAM3InteractiveImagePredictor(max_hole_area=256)

// S3DE: "S3DE" | uint32 version | uint32 header_len | JSON header | payload (per-channel quantised, bit-packed).
export function parseS3DE(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.subarray(0, 4));
  if (magic !== "S3DE") throw new Error("embeddings: not an S3DE blob (bad magic)");
  const view = new DataView(buffer);
  const version = view.getUint32(4, true);
  if (version !== 1) throw new Error(`embeddings: format version ${version} is not supported (expected 1)`);
  const headerLen = view.getUint32(8, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(12, 12 + headerLen)));
  const base = 12 + headerLen;
  const out = {};
  for (const e of header.tensors) {
    const count = e.shape.reduce((a, b) => a * b, 1);
    const chunk = bytes.subarray(base + e.offset, base + e.offset + e.length);
    if (chunk.length !== e.length) throw new Error(`embeddings: tensor ${e.name} is truncated`);
    const channels = e.shape[1];
    const perChannel = e.shape.slice(2).reduce((a, b) => a * b, 1);
    if (e.shape[0] !== 1) throw new Error(`embeddings: tensor ${e.name} has batch ${e.shape[0]}, expected 1`);
    const levels = (1 << e.bits) - 1;
    const data = new Float32Array(count);
    const q = unpack(chunk, e.bits, count);
    for (let c = 0; c < channels; c++) {
      const lo = Math.fround(e.lo[c]);
      const hi = Math.fround(e.hi[c]);
      const step = hi > lo ? Math.fround(Math.fround(hi - lo) / levels) : 1;
      const start = c * perChannel;
      for (let i = start; i < start + perChannel; i++) data[i] = lo + q[i] * step;
    }
    out[e.name] = { dims: e.shape, data };
  }
  return out;
}

function unpack(chunk, bits, count) {
  const q = new Uint8Array(count + 4);
  if (bits === 8) q.set(chunk.subarray(0, count));
  else if (bits === 4) {
    for (let i = 0, j = 0; j < count; i++, j += 2) { q[j] = chunk[i] & 0x0f; q[j + 1] = chunk[i] >> 4; }
  } else if (bits === 6) {
    for (let i = 0, j = 0; j < count; i += 3, j += 4) {
      const word = chunk[i] | (chunk[i + 1] << 8) | (chunk[i + 2] << 16);
      q[j] = word & 0x3f; q[j + 1] = (word >> 6) & 0x3f; q[j + 2] = (word >> 12) & 0x3f; q[j + 3] = (word >> 18) & 0x3f;
    }
  } else throw new Error(`embeddings: ${bits} bits per value is not supported`);
  return q;
}

// Decoder inputs as SAM 3's interactive predictor builds them: the box's corners first (labels 2, 3), then
// the clicks (1 object, 0 background), then the padding point (-1) the prompt encoder always appends.
export function promptInputs(points, box) {
  const coords = [];
  const labels = [];
  if (box) { coords.push(box[0], box[1], box[2], box[3]); labels.push(2, 3); }
  for (const p of points) { coords.push(p.x, p.y); labels.push(p.label ? 1 : 0); }
  coords.push(0, 0); labels.push(-1);
  return { coords: new Float32Array(coords), labels: new Float32Array(labels), n: labels.length };
}

// Which output the predictor returns: the best multimask output (1-3) for one click alone; otherwise the
// single-mask output (0), unless its stability score is below 0.98 (then the best multimask output).
export function chooseMask(logits, iou, nPoints, hasBox) {
  let best = 1;
  for (let i = 2; i <= 3; i++) if (iou[i] > iou[best]) best = i;
  if (nPoints <= 1 && !hasBox) return best;
  let inter = 0;
  let union = 0;
  for (let i = 0; i < LOW_RES * LOW_RES; i++) {
    if (logits[i] > STABILITY_DELTA) inter++;
    if (logits[i] > -STABILITY_DELTA) union++;
  }
  return (union ? inter / union : 1) >= STABILITY_THRESH ? 0 : best;
}

// Background regions (logit <= 0, 8-connected) of at most 256 low-resolution pixels become foreground
// (logit 10), as the predictor's postprocess_masks does. Returns a new Float32Array of 288x288 logits.
export function fillHoles(logits, offset) {
  const n = LOW_RES * LOW_RES;
  const out = logits.slice(offset, offset + n);
  const seen = new Uint8Array(n);
  const stack = new Int32Array(n);
  const region = new Int32Array(n);
  for (let start = 0; start < n; start++) {
    if (seen[start] || out[start] > 0) continue;
    let top = 0;
    let size = 0;
    stack[top++] = start; seen[start] = 1;
    while (top) {
      const i = stack[--top];
      region[size++] = i;
      const y = (i / LOW_RES) | 0;
      const x = i - y * LOW_RES;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = y + dy;
        if (yy < 0 || yy >= LOW_RES) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const xx = x + dx;
          if (xx < 0 || xx >= LOW_RES) continue;
          const j = yy * LOW_RES + xx;
          if (!seen[j] && out[j] <= 0) { seen[j] = 1; stack[top++] = j; }
        }
      }
    }
    if (size <= MAX_HOLE_AREA) for (let k = 0; k < size; k++) out[region[k]] = 10;
  }
  return out;
}

// Bilinear upsampling (PyTorch's align_corners=False) of one 288x288 logit map to width x height, then > 0.
export function upsampleMask(logits, offset, width, height) {
  const mask = new Uint8Array(width * height);
  const sx = LOW_RES / width;
  const sy = LOW_RES / height;
  const x0s = new Int32Array(width);
  const x1s = new Int32Array(width);
  const wxs = new Float32Array(width);
  for (let x = 0; x < width; x++) {
    const src = Math.max(0, (x + 0.5) * sx - 0.5);
    const i0 = Math.floor(src);
    x0s[x] = i0; x1s[x] = Math.min(i0 + 1, LOW_RES - 1); wxs[x] = src - i0;
  }
  for (let y = 0; y < height; y++) {
    const src = Math.max(0, (y + 0.5) * sy - 0.5);
    const j0 = Math.floor(src);
    const j1 = Math.min(j0 + 1, LOW_RES - 1);
    const wy = src - j0;
    const r0 = offset + j0 * LOW_RES;
    const r1 = offset + j1 * LOW_RES;
    const row = y * width;
    for (let x = 0; x < width; x++) {
      const a = x0s[x]; const b = x1s[x]; const wx = wxs[x];
      const top = logits[r0 + a] + (logits[r0 + b] - logits[r0 + a]) * wx;
      const bottom = logits[r1 + a] + (logits[r1 + b] - logits[r1 + a]) * wx;
      mask[row + x] = top + (bottom - top) * wy > 0 ? 1 : 0;
    }
  }
  return mask;
}

export class ClickDecoder {
  constructor(session, threads) { this.session = session; this.threads = threads; this.features = null; }

  // model: the ONNX bytes (ArrayBuffer). Two or more wasm threads need cross-origin isolation.
  static async create(model) {
    ort.env.wasm.wasmPaths = "/static/ort/";
    const threads = self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
    ort.env.wasm.numThreads = threads;
    const session = await ort.InferenceSession.create(new Uint8Array(model), {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
    return new ClickDecoder(session, threads);
  }

  setEmbeddings(buffer, width, height) {
    const t = parseS3DE(buffer);
    this.features = {};
    for (const name of ["image_embed", "high_res_feats_0", "high_res_feats_1"]) {
      if (!t[name]) throw new Error(`embeddings: tensor ${name} is missing`);
      this.features[name] = new ort.Tensor("float32", t[name].data, t[name].dims);
    }
    this.width = width; this.height = height;
    this.noMask = new ort.Tensor("float32", new Float32Array(LOW_RES * LOW_RES), [1, 1, LOW_RES, LOW_RES]);
    this.hasMask = new ort.Tensor("float32", new Float32Array([0]), [1]);
    this.size = new ort.Tensor("float32", new Float32Array([height, width]), [2]);
  }

  // Returns {mask (Uint8Array, width*height, 1 = object), score, index, ms (decoder), totalMs}.
  async decode(points, box) {
    const started = performance.now();
    const { coords, labels, n } = promptInputs(points, box);
    const feeds = {
      ...this.features,
      point_coords: new ort.Tensor("float32", coords, [1, n, 2]),
      point_labels: new ort.Tensor("float32", labels, [1, n]),
      mask_input: this.noMask, has_mask_input: this.hasMask, orig_im_size: this.size,
    };
    const out = await this.session.run(feeds);
    const decoded = performance.now();
    const iou = out.iou_predictions.data;
    const index = chooseMask(out.low_res_masks.data, iou, points.length, !!box);
    const logits = fillHoles(out.low_res_masks.data, index * LOW_RES * LOW_RES);
    const mask = upsampleMask(logits, 0, this.width, this.height);
    this.lastOutput = { lowRes: out.low_res_masks.data, iou: Array.from(iou), index };  // for checks
    return { mask, score: iou[index], index, ms: decoded - started, totalMs: performance.now() - started };
  }
}
