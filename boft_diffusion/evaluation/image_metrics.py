"""Image measures that need no tiny world: edge agreement for control, CLIP and DINO similarity
on real checkpoints."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def edges(image: Image.Image, threshold: float = 0.2) -> np.ndarray:
    """Binary edge map: Sobel gradient magnitude above ``threshold`` of its maximum."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    padded = np.pad(gray, 1, mode="edge")
    gx = (padded[1:-1, 2:] - padded[1:-1, :-2]) * 2 + padded[:-2, 2:] - padded[:-2, :-2] + padded[2:, 2:] - padded[2:, :-2]
    gy = (padded[2:, 1:-1] - padded[:-2, 1:-1]) * 2 + padded[2:, :-2] - padded[:-2, :-2] + padded[2:, 2:] - padded[:-2, 2:]
    magnitude = np.hypot(gx, gy)
    return magnitude > threshold * max(float(magnitude.max()), 1e-6)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def edge_agreement(image: Image.Image, condition_edges: Image.Image) -> float:
    """F1 between the generated image's edges and a conditioning edge map, with 1-pixel tolerance."""
    generated = edges(image)
    reference = np.asarray(condition_edges.convert("L").resize(image.size)) > 127
    if not generated.any() and not reference.any():
        return 1.0
    precision = (generated & _dilate(reference)).sum() / max(generated.sum(), 1)
    recall = (reference & _dilate(generated)).sum() / max(reference.sum(), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-9))


def _normalise(x) -> torch.Tensor:
    """Unit vectors; accepts transformers >= 5's output objects (projected features in pooler_output)."""
    if not isinstance(x, torch.Tensor):
        x = x.pooler_output
    return x / x.norm(dim=-1, keepdim=True)


def clip_scores(model_path: str, images, prompt: str, instance_images) -> dict[str, float]:
    """CLIP-T (image-prompt cosine) and CLIP-I (generated-instance image cosine)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_path).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    with torch.no_grad():
        generated = _normalise(model.get_image_features(**processor(images=list(images), return_tensors="pt")))
        reference = _normalise(model.get_image_features(**processor(images=list(instance_images), return_tensors="pt")))
        text_inputs = processor(text=[prompt.replace(" sks", "")], return_tensors="pt", padding=True, truncation=True)
        text = _normalise(model.get_text_features(**text_inputs))
    return {"clip_t": float((generated @ text.T).mean()), "clip_i": float((generated @ reference.T).mean())}


def dino_score(model_path: str, images, instance_images) -> float:
    """Mean cosine between the DINO CLS embeddings of generated and instance images."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    with torch.no_grad():
        def embed(batch):
            return _normalise(model(**processor(images=list(batch), return_tensors="pt")).last_hidden_state[:, 0])

        return float((embed(images) @ embed(instance_images).T).mean())
