"""OpenCLIP ModifiedResNet image towers (RN50, RN101, RN50x4 ... RN50x64)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily

# --pretrained none: weight of each bottleneck's last BatchNorm (open_clip initialises it to 0)
RESIDUAL_BRANCH_SCALE = 0.2


@register
class OpenClipResNetFamily(OpenClipFamily):
    name = "openclip-resnet"
    label = "openclip"
    priority = 10
    image_pooling = "attention pool (AttentionPool2d, query = mean token)"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "OpenCLIP ModifiedResNet image towers (RN50, RN101, RN50x4 ... RN50x64)"
    layer_names = ("resblocks",)

    def random_init(self, model: Any, transform: Any) -> list[str]:
        """open_clip's ModifiedResNet init leaves BatchNorm at running mean 0 / var 1 and zeroes
        each bottleneck's last BatchNorm: activations then shrink until the attention pool's
        biases dominate and every image gets nearly one embedding (centred spread 5e-4 of the
        unit norm on RN50: fp16 rounding alone gave centred error 0.03-1.0 at cosine 0.9999999).
        Like trained ResNets: BatchNorm statistics measured on the built-in varied images
        (cumulative average) and residual branches at RESIDUAL_BRANCH_SCALE of the stream.
        Measured on RN50 (depth 1 per stage): spread 0.53, fp16 centred error 3.3e-3."""
        import numpy as np
        import torch
        from PIL import Image

        from clipfast.samples import sample_images

        notes = super().random_init(model, transform)
        visual = model.visual
        bns = [(n, m) for n, m in visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for n, m in bns:
            m.reset_running_stats()
            m.momentum = None
            if n.endswith("bn3"):
                torch.nn.init.constant_(m.weight, RESIDUAL_BRANCH_SCALE)
        batch = np.stack([np.asarray(transform(Image.fromarray(a).convert("RGB")),
                                     dtype=np.float32) for a in sample_images(8)])
        visual.train()
        with torch.no_grad():
            visual(torch.from_numpy(batch))
        visual.eval()
        for _, m in bns:
            m.momentum = 0.1
            # rounded to fp16 precision: a rebuild on another host (other thread count, other
            # summation order) gets the same bytes, so the weights fingerprint still matches
            m.running_mean.copy_(m.running_mean.half().float())
            m.running_var.copy_(m.running_var.half().float())
        return [*notes, f"{len(bns)} BatchNorm layers calibrated on 8 built-in images, "
                        f"bottleneck bn3 weights {RESIDUAL_BRANCH_SCALE}"]

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return isinstance((cfg.get("vision_cfg") or {}).get("layers"), (list, tuple))
