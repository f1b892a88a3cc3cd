"""Fine-tuned image-text retrieval (SPEC §8.5): the engine's ``retrieval`` task (``florence.adapters.retrieval_task``:
continued UniCL training of both towers on the target pairs), then retrieval evaluated on the test split.

Florence's recipe [FL §3.5]: UniCL loss, batch 3,072, 12 epochs, cosine decay, 200 warm-up steps, peak LR 2e-5. The
training pairs (Karpathy ``train`` split, plus ``restval`` for COCO, or a CSV) are written to a caption table
(``image,caption`` with absolute paths) that the engine reads as a ``caption_table`` source; every caption is its own
label (a caption hash), as in image-text pre-training.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from florence.adapters.retrieval import CaptionSet

FINETUNE_PROTOCOL_ID = "florence-unicl-finetune-v1"


@dataclass
class FinetuneRecipe:
    """Continued UniCL training; the defaults are Florence's retrieval fine-tuning recipe."""

    lr: float = 2e-5  # peak learning rate
    batch_size: int = 3072  # global batch per optimizer step
    epochs: float | None = 12.0  # passes over the training pairs (or give steps)
    steps: int | None = None  # optimizer steps; overrides epochs
    warmup_steps: int = 200
    weight_decay: float = 0.05  # PROPOSAL: the paper does not give it
    precision: str = "fp32"  # fp32 | bf16 | fp16 (engine autocast)
    grad_cache_chunk: int | None = None  # gradient cache chunk for large batches on one device
    num_workers: int = 0
    seed: int = 0


def write_caption_table(pairs: CaptionSet, path: str | Path) -> Path:
    """Write ``pairs`` as a CSV ``image,caption`` (absolute image paths), one row per caption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for caption, owner in zip(pairs.captions, pairs.text_to_image):
            writer.writerow([str(Path(pairs.image_paths[owner]).resolve()), caption])
    return path


def finetune_retrieval(bundle: str | Path, train_pairs: CaptionSet, run_dir: str | Path,
                       recipe: FinetuneRecipe | None = None):
    """Continue UniCL training of the bundle on ``train_pairs``; returns the engine's ``TrainResult``
    (``final_dir`` is the fine-tuned bundle, ``<run_dir>/final``)."""
    from florence.engine.config import (CheckpointConfig, ModelConfig, OptimConfig, OutputConfig, PrecisionConfig,
                                        RunConfig, ScheduleConfig)
    from florence.engine.train import run

    recipe = recipe or FinetuneRecipe()
    run_dir = Path(run_dir)
    table = write_caption_table(train_pairs, run_dir / "train_pairs.csv")
    batch = min(recipe.batch_size, len(train_pairs.captions))
    cfg = RunConfig(
        task="retrieval",
        model=ModelConfig(pretrained=str(bundle)),
        data={"sources": [{"type": "caption_table", "path": str(table), "name": "retrieval_train"}],
              "num_workers": recipe.num_workers},
        optim=OptimConfig(lr=recipe.lr, weight_decay=recipe.weight_decay, batch_size=batch,
                          grad_cache_chunk=recipe.grad_cache_chunk),
        schedule=ScheduleConfig(steps=recipe.steps, epochs=None if recipe.steps else recipe.epochs,
                                warmup_steps=recipe.warmup_steps),
        precision=PrecisionConfig(dtype=recipe.precision),
        checkpoint=CheckpointConfig(every_steps=None, resume="auto"),
        output=OutputConfig(dir=str(run_dir), tensorboard=False),
        seed=recipe.seed,
    )
    cfg.validate()
    return run(cfg)
