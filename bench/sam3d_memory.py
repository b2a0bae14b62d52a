"""Parameter bytes of every SAM 3D Objects stage and of SAM 3, against a 24 GB A10G (g5). No GPU needed.

    python bench/sam3d_memory.py [--config-dir /opt/checkpoints/sam-3d-objects]

What is counted, and how each figure is known:
- SAM 3D Objects' networks are built from upstream's own classes (``sam3d_objects`` @ cf06676, from PyPI
  ``sam3d==0.1.2`` where its bytes equal upstream's: ``tests/sam3d_double/upstream.py``) on torch's ``meta``
  device (no memory, no weights), with the architecture of the released HF configs: ``--config-dir`` reads them
  from a checkpoint folder (``ss_generator.yaml``, ``slat_generator.yaml``, ``slat_decoder_*.yaml``); without
  one, ``ARCHITECTURE`` below holds the same numbers as read from a public copy of facebook/sam-3d-objects'
  ``checkpoints/hf`` (kpfeifer-work/sam-3d-objects @ 5300050; the HF repo is gated). Bytes are those of the
  parameters as built (``use_fp16: true`` networks keep their transformer blocks in float16). ``counted``.
- DINOv2 ViT-L/14 + 4 registers (two per generator: image and mask) and MoGe's ViT-L encoder are counted with
  timm's identical architecture (``vit_large_patch14_reg4_dinov2`` / ``vit_large_patch14_dinov2``) on
  ``meta``. MoGe's head is not counted. ``counted``.
- Networks whose config is not public (``ss_decoder``), or that cannot be built here (``slat_decoder_mesh``: its
  FlexiCubes part needs a CUDA package), come from their checkpoint file sizes as listed in a public download
  recipe (the decoders' files hold their parameters as built). ``from checkpoint size``.
- SAM 3 (image model with the interactive predictor, as the segmenter builds it) is built here on the CPU with
  random weights through the project's own loader and its parameters counted. ``counted``.
Activations are not counted: they depend on the photo and the number of voxels, and only a GPU run measures
them (``bench/gpu.py``). "Fits" below means the weights leave that much room, not that a stage ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "sam3d_double"))

A10G_BYTES = 24 * 10**9  # "24 GB" as sold; about 22.1 GiB usable after the CUDA context
GIB = 2**30

_FLOW_COMMON = {"cond_channels": 1024, "in_channels": 8, "out_channels": 8, "model_channels": 1024,
                "num_blocks": 24, "num_heads": 16, "mlp_ratio": 4, "pe_mode": "ape", "qk_rms_norm": True,
                "use_fp16": True, "condition_embedder": None, "force_zeros_cond": True}
_PKG = "sam3d_objects.model.backbone.tdfy_dit.models"


def _latent(in_channels: int, embedder: dict) -> dict:
    return {"_target_": f"{_PKG}.mm_latent.Latent", "in_channels": in_channels, "model_channels": 1024,
            "pos_embedder": {"model_channels": 1024} | embedder}


_TOKEN = {"_target_": f"{_PKG}.mm_latent.LearntPositionEmbedder", "token_len": 1}
# The networks' constructor arguments in the released HF configs (numbers only; see the module docstring).
ARCHITECTURE = {
    "ss_generator": _FLOW_COMMON | {
        "_target_": f"{_PKG}.mot_sparse_structure_flow.SparseStructureFlowTdfyWrapper",
        "freeze_d_time_embedder": True, "freeze_shared_parameters": True, "is_shortcut_model": True,
        "patch_size": 1, "resolution": 16, "use_checkpoint": False,
        "latent_mapping": {
            "6drotation_normalized": _latent(6, _TOKEN), "scale": _latent(3, _TOKEN),
            "translation": _latent(3, _TOKEN), "translation_scale": _latent(1, _TOKEN),
            "shape": _latent(8, {"_target_": f"{_PKG}.mm_latent.ShapePositionEmbedder", "patch_size": 1,
                                 "resolution": 16}),
        },
        "latent_share_transformer": {"6drotation_normalized": ["6drotation_normalized", "translation", "scale",
                                                               "translation_scale"]},
    },
    "slat_generator": _FLOW_COMMON | {
        "_target_": f"{_PKG}.structured_latent_flow.SLatFlowModelTdfyWrapper", "io_block_channels": [128],
        "num_io_res_blocks": 2, "patch_size": 2, "resolution": 64,
    },
    "slat_decoder_gs": {
        "_target_": f"{_PKG}.structured_latent_vae.decoder_gs.SLatGaussianDecoderTdfyWrapper", "resolution": 64,
        "model_channels": 768, "latent_channels": 8, "num_blocks": 12, "num_heads": 12, "mlp_ratio": 4,
        "attn_mode": "swin", "window_size": 8, "use_fp16": True,
        "representation_config": {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0,
                                         "_rotation": 0.1}, "perturb_offset": True, "voxel_size": 0.5,
                                  "num_gaussians": 32, "2d_filter_kernel_size": 0.1, "3d_filter_kernel_size": 0.0009,
                                  "scaling_bias": 0.004, "opacity_bias": 0.1, "scaling_activation": "softplus"},
    },
    "slat_decoder_mesh": {
        "_target_": f"{_PKG}.structured_latent_vae.decoder_mesh.SLatMeshDecoderTdfyWrapper", "resolution": 96,
        "model_channels": 768, "latent_channels": 8, "num_blocks": 12, "num_heads": 12, "mlp_ratio": 4,
        "attn_mode": "swin", "window_size": 8, "use_fp16": True, "representation_config": {"use_color": True},
    },
}
ARCHITECTURE["slat_decoder_gs_4"] = ARCHITECTURE["slat_decoder_gs"] | {
    "representation_config": ARCHITECTURE["slat_decoder_gs"]["representation_config"] | {"num_gaussians": 4}}
# Checkpoint file sizes in bytes (a public download recipe of facebook/sam-3d-objects' checkpoints/hf).
CHECKPOINT_BYTES = {"ss_generator": 6_690_136_964, "slat_generator": 4_906_537_684, "ss_decoder": 147_609_242,
                    "slat_decoder_gs": 171_476_155, "slat_decoder_gs_4": 170_269_801,
                    "slat_decoder_mesh": 363_726_862}
# Which networks each stage needs (sam3d_reconstructor.STAGE_MODULES); the released pipeline has no ss_encoder.
STAGES = {
    "point map (MoGe)": ["moge_vitl_encoder"],
    "sparse structure (stage 1)": ["ss_generator", "ss_condition_embedder", "ss_decoder"],
    "structured latent (stage 2)": ["slat_generator", "slat_condition_embedder"],
    "decode (gaussian + mesh)": ["slat_decoder_gs", "slat_decoder_gs_4", "slat_decoder_mesh"],
}


def _size(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _from_configs(config_dir: Path | None) -> dict:
    """``{name: config}`` for the upstream networks: from ``config_dir``'s yaml files when given, else ours."""
    if config_dir is None:
        return {name: dict(cfg) for name, cfg in ARCHITECTURE.items()}
    import yaml

    out = {}
    for name in ("ss_generator", "slat_generator"):
        cfg = yaml.safe_load((config_dir / f"{name}.yaml").read_text())
        out[name] = cfg["module"]["generator"]["backbone"]["reverse_fn"]["backbone"]
    for name in ("slat_decoder_gs", "slat_decoder_gs_4", "slat_decoder_mesh"):
        if (config_dir / f"{name}.yaml").is_file():
            out[name] = yaml.safe_load((config_dir / f"{name}.yaml").read_text())
    return out


def count_sam3d(config_dir: Path | None) -> dict[str, dict]:
    import torch
    import upstream
    from hydra.utils import instantiate

    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        upstream.assemble(Path(tmp))
        with upstream.imported(Path(tmp)), torch.device("meta"):
            for name, cfg in _from_configs(config_dir).items():
                try:
                    params, nbytes = _size(instantiate(cfg))
                    figures[name] = {"params": params, "bytes": nbytes, "how": "counted (upstream class, meta)"}
                except Exception as exc:  # noqa: BLE001  (a class needing a CUDA package: fall back, say so)
                    # The decoders' checkpoints hold their parameters as built (slat_decoder_gs: 171,476,155 B
                    # on disk, 171,440,896 B counted here), so the file size stands in for the bytes.
                    figures[name] = {"params": None, "bytes": CHECKPOINT_BYTES[name],
                                     "how": f"from checkpoint size as stored (building it here failed: "
                                            f"{type(exc).__name__})"}
    import timm

    with torch.device("meta"):
        dino_p, dino_b = _size(timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False))
        moge_p, moge_b = _size(timm.create_model("vit_large_patch14_dinov2", pretrained=False))
    for name in ("ss_condition_embedder", "slat_condition_embedder"):
        figures[name] = {"params": 2 * dino_p, "bytes": 2 * dino_b,
                         "how": "counted: 2 x DINOv2 ViT-L/14-reg4 (timm, meta), float32; fuser projections not "
                                "counted"}
    figures["moge_vitl_encoder"] = {"params": moge_p, "bytes": moge_b,
                                    "how": "counted: DINOv2 ViT-L/14 encoder (timm, meta), float32; head not counted"}
    figures["ss_decoder"] = {"params": CHECKPOINT_BYTES["ss_decoder"] // 4, "bytes": CHECKPOINT_BYTES["ss_decoder"],
                             "how": "from checkpoint size (config not public), float32 assumed"}
    return figures


def count_sam3() -> dict:
    from sam3d_pipeline.backends.sam3.segmenter import load_model
    from sam3d_pipeline.settings import Settings

    loaded = load_model(Settings(sam3_random_init=True, sam3_device="cpu"))
    params, nbytes = _size(loaded.model)
    return {"params": params, "bytes": nbytes, "dtype": loaded.dtype if hasattr(loaded, "dtype") else "float32",
            "how": "counted (sam3 0.1.4 image model + interactive predictor, built on the CPU)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", type=Path, default=None, help="SAM 3D Objects checkpoint folder (HF layout)")
    parser.add_argument("--skip-sam3", action="store_true", help="do not build SAM 3 (about 20 s and 5 GiB RAM)")
    args = parser.parse_args()
    nets = count_sam3d(args.config_dir)
    print(f"SAM 3D Objects networks ({'configs from ' + str(args.config_dir) if args.config_dir else 'ARCHITECTURE'}):")
    for name, f in nets.items():
        params = f"{f['params'] / 1e6:9.1f} M params" if f["params"] else f"{'?':>9} M params"
        print(f"  {name:<24} {params} {f['bytes'] / GIB:7.2f} GiB   {f['how']}")
    stages = {}
    print(f"Per stage, weights on the GPU in low-memory mode, against an A10G ({A10G_BYTES / 1e9:.0f} GB):")
    for stage, names in STAGES.items():
        nbytes = sum(nets[n]["bytes"] for n in names)
        stages[stage] = nbytes
        print(f"  {stage:<28} {nbytes / GIB:6.2f} GiB weights; {(A10G_BYTES - nbytes) / GIB:6.2f} GiB left for "
              "activations (not measured)")
    everything = sum(f["bytes"] for f in nets.values())
    print(f"  {'default mode (all resident)':<28} {everything / GIB:6.2f} GiB weights; "
          f"{(A10G_BYTES - everything) / GIB:6.2f} GiB left for activations (not measured)")
    result = {"sam3d_networks": nets, "sam3d_stage_weight_bytes": stages, "sam3d_all_weight_bytes": everything,
              "a10g_bytes": A10G_BYTES}
    if not args.skip_sam3:
        sam3 = count_sam3()
        print(f"SAM 3: {sam3['params'] / 1e6:.1f} M params, {sam3['bytes'] / GIB:.2f} GiB ({sam3['how']})")
        result["sam3"] = sam3
    print("BENCH_JSON " + json.dumps({"sam3d_memory": result}))


if __name__ == "__main__":
    main()
