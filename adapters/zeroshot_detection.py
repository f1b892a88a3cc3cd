"""Zero-shot detection, the paper's protocol (SPEC §5.1): class-agnostic proposals, each classified by the dual
encoder's zero-shot text classifier.

A detector trained class-agnostically (``num_classes=1``: ``data.class_agnostic: true``) proposes boxes for any
object. Each proposal is classified by **crop and encode** (our choice; the alternative, pooled region features of the
detector's own backbone, needs the detector's tower to equal the dual encoder's, which fine-tuning breaks): the square
region around the box (side ``context`` × the longer box side, centred on the box, so the item keeps its aspect as in
the dual encoder's training images; zero padding outside the image) is resized by the dual encoder's eval transform
and embedded; its class is the arg-max of the cosine similarity with the prompt-ensembled class embeddings (SPEC §9.4),
and its score is ``proposal score × softmax probability`` of that class (softmax at the dual encoder's logit scale).
Class names never seen by the detector (``florence detect --labels "a,b,c"``) are detected this way.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import nn

from florence.adapters.prompt_templates import get_template_set
from florence.adapters.zeroshot import build_zeroshot_classifier, model_text_encoder, require_dual_encoder
from florence.data.transforms import build_transform


def square_crops(image: Image.Image, boxes: torch.Tensor, context: float) -> list[Image.Image]:
    """Square crops (side ``context`` × the longer side of each xyxy box, centred on it) of a PIL image."""
    crops = []
    for x1, y1, x2, y2 in boxes.tolist():
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, context * max(x2 - x1, y2 - y1, 1.0) / 2
        crops.append(image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half))))
    return crops


class ProposalClassifier:
    """Classifies proposals with a dual encoder (``florence.backbone.unicl.UniCLModel``) against ``class_names``.

    Args:
        dual_encoder: the text + image model (its tokenizer attached).
        class_names: C names (or synonym lists) of the categories to detect.
        templates: prompt templates (default: the 80 CLIP ImageNet templates).
        context: crop side / longer box side.
        batch_size: crops per image-encoder call.
    """

    def __init__(self, dual_encoder: nn.Module, class_names: Sequence[str], *, templates: Sequence[str] | None = None,
                 context: float = 1.1, device="cpu", batch_size: int = 256) -> None:
        require_dual_encoder(dual_encoder, "zero-shot detection")
        self.model = dual_encoder.eval().to(device)
        self.device = torch.device(device)
        self.context = float(context)
        self.batch_size = int(batch_size)
        self.transform = build_transform(dict(dual_encoder.preprocess), train=False)
        with torch.no_grad():
            encode = model_text_encoder(self.model, self.device)
            self.class_embeds = build_zeroshot_classifier(encode, list(class_names),
                                                          templates or get_template_set("imagenet"))  # C, D
        self.class_names = list(class_names)

    @torch.no_grad()
    def __call__(self, image: Image.Image, proposals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``proposals`` (boxes (n, 4) xyxy in ``image``'s pixels, scores (n,)) -> the same boxes with ``labels``
        (n,) indices into ``class_names``, ``scores`` = proposal score × class probability, sorted by score."""
        boxes, scores = proposals["boxes"], proposals["scores"]
        if len(boxes) == 0:
            return {"boxes": boxes, "scores": scores, "labels": torch.zeros(0, dtype=torch.int64)}
        crops = [self.transform(c) for c in square_crops(image, boxes, self.context)]
        logits = []
        for start in range(0, len(crops), self.batch_size):
            x = torch.stack(crops[start:start + self.batch_size]).to(self.device)  # b, 3, h, w
            emb = self.model.encode_image(x).float()  # b, D unit norm
            logits.append(self.model.scale().float() * emb @ self.class_embeds.to(self.device).T)  # b, C
        prob, labels = torch.cat(logits).softmax(-1).max(-1)
        final = scores * prob.cpu()
        order = final.argsort(descending=True)
        return {"boxes": boxes[order], "scores": final[order], "labels": labels.cpu()[order]}
