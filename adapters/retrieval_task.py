"""Fine-tuned image-text retrieval as a task of the engine (``task: retrieval``; SPEC §8.5): continued UniCL training
of both towers on the target pairs (every caption its own label), evaluated by R@1/5/10 in both directions on a
held-out caption set (``task.eval_captions``, Karpathy JSON or an ``image,caption`` CSV) — the protocol of
``florence eval retrieval``. ``florence eval retrieval-finetune`` builds this task's config
(``florence.benchmarks.finetune_retrieval``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from florence.adapters.pretrain import UniCLTask
from florence.adapters.retrieval import encode_captions, load_caption_csv, load_karpathy_json, recall_at_k
from florence.data.eval_loader import EvalLoader, map_batches
from florence.data.source_dataset import ImageList
from florence.data.transforms import build_transform
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv
from florence.registry import register_task


@dataclass
class RetrievalOptions:
    eval_captions: str | None = None  # held-out pairs: Karpathy JSON or image,caption CSV (needed by eval.* keys)
    eval_image_root: str | None = None  # image folder of eval_captions (default: the caption file's folder)
    eval_split: str = "val"  # Karpathy split to evaluate on during training


@register_task("retrieval")
class RetrievalTask(UniCLTask):
    """UniCL fine-tuning on image-caption pairs, evaluated by retrieval recall."""

    Options = RetrievalOptions

    def validate(self) -> None:
        super().validate()
        if self.cfg.eval.source is not None:
            raise ConfigError("eval.source: the retrieval task evaluates on task.eval_captions")

    def has_evaluation(self) -> bool:
        return self.options.eval_captions is not None

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        o, ev = self.options, self.cfg.eval
        if not o.eval_captions:
            return {}
        path = Path(o.eval_captions)
        root = Path(o.eval_image_root) if o.eval_image_root else path.parent
        pairs = load_karpathy_json(path, root, o.eval_split) if path.suffix == ".json" else load_caption_csv(path, root)
        images = ImageList(pairs.image_paths, np.arange(len(pairs.image_paths)),
                           build_transform(model.preprocess, train=False))
        loader = EvalLoader(images, batch_size=ev.batch_size, name=str(path))
        image_embeds, kept = map_batches(model.encode_image, loader, device=env.device)  # N_img, D
        pairs = pairs.keep_images(kept)
        text_embeds = encode_captions(model, pairs.captions, ev.batch_size, env.device).numpy()  # N_txt, D
        return recall_at_k(image_embeds @ text_embeds.T, pairs.text_to_image)
