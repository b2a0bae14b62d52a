"""Tiny torch networks that upstream's ``InferencePipeline`` builds from test configs (hydra ``_target_``s).

They have the attributes ``InferencePipeline.__init__`` sets on the real ones (``override_*_cfg_config``,
``inference_pipeline.py`` L418-464 @ cf06676) and a few parameters each, so device placement and the
decode/post-process output dict run upstream's own code on a CPU.
"""

from __future__ import annotations

import types

import torch


class TinyNet(torch.nn.Module):
    """A network with one linear layer; ``forward`` returns a one-item list, as upstream's decoders do."""

    def __init__(self, width: int = 4, kind: str = "net"):
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return [types.SimpleNamespace(kind=self.kind, device=self.linear.weight.device)]


class TinyGenerator(TinyNet):
    """A generator with the ``reverse_fn.backbone.condition_embedder`` chain the pipeline configures."""

    def __init__(self, width: int = 4):
        super().__init__(width, "generator")
        self.inference_steps = 25
        self.rescale_t = 1
        self.reverse_fn = types.SimpleNamespace(
            strength=0.0, interval=[0, 500], strength_pm=0.0, unconditional_handling="",
            backbone=types.SimpleNamespace(condition_embedder=types.SimpleNamespace(normalize_images=False)),
        )
