"""``florence eval zeroshot|linear-probe|few-shot|retrieval|retrieval-finetune --model DIR --dataset NAME ...``.

``retrieval-finetune`` first continues UniCL training of the model on the training pairs (Karpathy ``--train-splits``
of the same caption file, or ``--train-captions CSV``) with the engine (``florence.benchmarks.finetune_retrieval``,
Florence's recipe unless ``--ft-*`` options say otherwise), then evaluates the fine-tuned bundle like ``retrieval``.

Each run writes ``<output>/<task>_<dataset>.json`` with:

- ``metrics``: fractions in [0, 1] (``top1``, ``top5``, ``mean_per_class`` or ``map_11point``; ``image_to_text_R@K``
  and ``text_to_image_R@K`` for retrieval; ``<k>shot_<metric>`` means for few-shot, stds in ``metrics_std``);
- ``protocol`` (id string), ``paper_metric``, ``model`` (bundle path and SHA-256 of its manifest), ``data``
  (manifest: file count and hash of each split read), ``templates`` (set name, count, SHA-256 of templates and class
  names), ``seeds``, ``precision``, ``versions`` (python, torch, ... ), ``args`` and protocol details;

plus a confusion-matrix PNG (classification) or a retrieval PNG next to it. Features and class embeddings are cached
under ``<output>/cache`` (``--cache-dir``): features keyed by model hash, transform, split (with the hash of its data
manifest, so another data root or caption file is never served stale features) and precision; class embeddings by
model hash, templates + class names and precision.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from florence.adapters import features as feats
from florence.adapters import linear_probe as lp
from florence.adapters import retrieval as rt
from florence.adapters import zeroshot as zs
from florence.adapters.prompt_templates import get_template_set
from florence.benchmarks import datasets as dsets
from florence.benchmarks import plots
from florence.data.templates import load_templates
from florence.engine.metrics import library_versions
from florence.engine.precision import build_precision

TASKS = ("zeroshot", "linear-probe", "few-shot", "retrieval", "retrieval-finetune")
ZEROSHOT_PROTOCOL_ID = "clip-prompt-ensemble-v1"
RETRIEVAL_PROTOCOL_ID = "clip-benchmark-recall-any-caption-v1"
DUAL_ENCODER_TASKS = ("zeroshot", "retrieval", "retrieval-finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence eval", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", required=True, help="checkpoint bundle directory (florence.from_pretrained)")
    p.add_argument("--dataset", required=True,
                   help="classification: one of " + ", ".join(dsets.build_specs()) + "; retrieval: a name for the "
                   "result file (e.g. flickr30k, coco)")
    p.add_argument("--data-root", default=None,
                   help="dataset root (classification; Fashion-MNIST defaults to /usr/share/datasets/fashion-mnist) "
                   "or image root (retrieval)")
    p.add_argument("--output", default="eval_results", help="directory for the JSON results and pictures")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="few-shot seeds")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the --train-limit subset and of the validation split carved from train")
    p.add_argument("--templates", default=None,
                   help="zero-shot template set name (imagenet, cifar10, ...) or a file; default: the dataset's set")
    p.add_argument("--classnames", default=None, help="ImageNet class-name file (default: open_clip's CLIP names)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="linear probe / few-shot: use a stratified seeded subset of N training images")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of train carved out as validation where the dataset has no official val split")
    p.add_argument("--refit", choices=("train+val", "train"), default="train+val")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations (CLIP protocol: 1000)")
    p.add_argument("--probe-threads", type=int, default=None,
                   help="BLAS/OpenMP threads for the logistic-regression fits (default: the libraries' own; 1 is "
                   "much faster on a machine shared with other busy processes)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    p.add_argument("--captions", default=None, help="retrieval: Karpathy-style JSON or CSV (image,caption)")
    p.add_argument("--split", default="test", help="retrieval: Karpathy split to evaluate")
    p.add_argument("--train-splits", nargs="+", default=["train"],
                   help="retrieval-finetune: Karpathy splits to train on (COCO: train restval)")
    p.add_argument("--train-captions", default=None, help="retrieval-finetune: training pairs CSV instead")
    p.add_argument("--ft-epochs", type=float, default=12.0)
    p.add_argument("--ft-steps", type=int, default=None, help="optimizer steps (overrides --ft-epochs)")
    p.add_argument("--ft-lr", type=float, default=2e-5)
    p.add_argument("--ft-batch-size", type=int, default=3072)
    p.add_argument("--ft-warmup-steps", type=int, default=200)
    p.add_argument("--cache-dir", default=None, help="feature / class-embedding cache (default <output>/cache)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class _Context:
    """What every protocol needs: the model, its hash, the run options."""

    def __init__(self, model, model_hash: str, model_path: str, args: argparse.Namespace):
        self.model, self.model_hash, self.model_path, self.args = model, model_hash, model_path, args
        self.device = torch.device(args.device)
        self.cache_dir = None if args.no_cache else Path(args.cache_dir or Path(args.output) / "cache")
        from florence.data.transforms import build_transform

        self.transform = build_transform(dict(model.preprocess), train=False)
        self.transform_key = feats.transform_key(dict(model.preprocess), extra="eval")
        self.autocast = build_precision(args.precision, self.device).autocast
        self._manifests: dict[tuple, dict] = {}

    def manifest(self, split: dsets.EvalSplit) -> dict:
        """``dsets.data_manifest`` of a split's files, computed once per file list (splits of one dataset folder
        share it)."""
        key = tuple(str(f) for f in split.files)
        if key not in self._manifests:
            self._manifests[key] = dsets.data_manifest(split.files)
        return self._manifests[key]

    def loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.args.batch_size, shuffle=False, num_workers=self.args.workers)

    def features(self, split: dsets.EvalSplit, split_key: str, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
        """Cached pooled ``(features (N, 8C), targets)`` of a split; the cache key is ``split_key`` plus the hash of
        the split's data manifest (``dsets.data_manifest``)."""
        split_key = f"{split_key}-{manifest['sha256'][:16]}"

        def compute():
            with tqdm(total=len(split.dataset), desc=f"images {split_key}", unit="img", disable=self.args.quiet) as bar:
                return feats.extract(self.model, self.loader(split.dataset), self.device, self.args.precision,
                                     progress=bar.update)

        x, y, _ = feats.cached_features(self.cache_dir, self.model_hash, self.transform_key, split_key,
                                        self.args.precision, compute)
        return x, y


def _subset(split: dsets.EvalSplit, idx: np.ndarray) -> dsets.EvalSplit:
    return dsets.EvalSplit(Subset(split.dataset, idx.tolist()), split.targets[idx], split.classnames, split.files)


def _header(task: str, protocol: str, ctx: _Context, spec_name: str, metric: str) -> dict[str, Any]:
    return {
        "task": task,
        "dataset": spec_name,
        "protocol": protocol,
        "paper_metric": metric,
        "model": {"path": ctx.model_path, "sha256": ctx.model_hash},
        "precision": ctx.args.precision,
        "seeds": {"split": ctx.args.split_seed, **({"few_shot": list(ctx.args.seeds)} if task == "few-shot" else {})},
        "versions": library_versions(),
        "args": {k: v for k, v in vars(ctx.args).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _templates(args: argparse.Namespace, default_set: str) -> tuple[str, tuple[str, ...]]:
    choice = args.templates or default_set
    if Path(choice).is_file():
        return str(choice), load_templates(choice)
    return choice, get_template_set(choice)


def _resolve_root(spec: dsets.DatasetSpec, data_root: str | None) -> Path:
    if data_root is not None:
        return Path(data_root)
    if spec.name == "fashion_mnist":
        from florence.data.sources import FASHION_MNIST_DIR

        return Path(FASHION_MNIST_DIR)
    raise SystemExit(f"florence eval: --data-root is required for {spec.name} (expected layout: {spec.layout})")


def run_zeroshot(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Zero-shot classification on the test split. Returns ``(result JSON, arrays for pictures)``."""
    args = ctx.args
    test = spec.load(root, "test", ctx.transform)
    set_name, templates = _templates(args, spec.template_set)
    classnames = test.classnames
    encoder = zs.model_text_encoder(ctx.model, ctx.device)

    def build():
        with tqdm(total=len(classnames) * len(templates), desc="class prompts", unit="prompt",
                  disable=args.quiet) as bar, torch.no_grad(), ctx.autocast():
            return zs.build_zeroshot_classifier(encoder, classnames, templates, args.batch_size, bar.update)

    classifier, from_cache = zs.cached_class_embeddings(ctx.cache_dir, ctx.model_hash, classnames, templates,
                                                        args.precision, build)
    manifest = ctx.manifest(test)
    pooled, targets = ctx.features(test, f"{spec.name}-test", manifest)
    image_embeds = feats.project(ctx.model, pooled)  # N, D
    scores = image_embeds @ classifier.numpy().T  # N, C
    metrics = lp.evaluate_scores(scores, targets)
    result = _header("zeroshot", ZEROSHOT_PROTOCOL_ID, ctx, spec.name, spec.metric)
    result.update({
        "metrics": metrics,
        "data": {"root": str(root), "test": manifest, "num_test": int(len(targets))},
        "templates": {"set": set_name, "count": len(templates), "sha256": zs.template_hash(templates, classnames)},
        "classnames": list(classnames),
        "class_embeddings_from_cache": from_cache,
    })
    return result, {"scores": scores, "targets": targets, "classnames": classnames}


def _probe_splits(ctx: _Context, spec: dsets.DatasetSpec, root: Path):
    """Train / val / test features for probing, with the split bookkeeping for the result."""
    args = ctx.args
    train = spec.load(root, "train", ctx.transform)
    info: dict[str, Any] = {"train_limit": args.train_limit}
    if args.train_limit is not None:
        keep = dsets.stratified_subset(train.targets, args.train_limit, seed=args.split_seed)
        train = _subset(train, keep)
    limit_key = f"-limit{args.train_limit}-seed{args.split_seed}" if args.train_limit is not None else ""
    manifests = {"train": ctx.manifest(train)}
    train_x, train_y = ctx.features(train, f"{spec.name}-train{limit_key}", manifests["train"])
    if spec.has_val(root):
        val = spec.load(root, "val", ctx.transform)
        manifests["val"] = ctx.manifest(val)
        val_x, val_y = ctx.features(val, f"{spec.name}-val", manifests["val"])
        info["val_source"] = "official"
    else:
        fit_idx, val_idx = dsets.carve_validation(train_y, args.val_fraction, seed=args.split_seed)
        val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[fit_idx], train_y[fit_idx]
        info["val_source"] = f"carved from train: stratified fraction {args.val_fraction}, seed {args.split_seed}"
    test = spec.load(root, "test", ctx.transform)
    manifests["test"] = ctx.manifest(test)
    test_x, test_y = ctx.features(test, f"{spec.name}-test", manifests["test"])
    info.update({"num_train": int(len(train_y)), "num_val": int(len(val_y)), "num_test": int(len(test_y)),
                 "feature_dim": int(train_x.shape[1])})
    return (train_x, train_y), (val_x, val_y), (test_x, test_y), test.classnames, info, manifests


def run_linear_probe(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLIP linear probe: sweep C on val, refit, test."""
    args = ctx.args
    train, val, test, classnames, info, manifests = _probe_splits(ctx, spec, root)
    metric = spec.metric
    probe = lp.linear_probe(train, val, test, metric, len(classnames), refit=args.refit, max_iter=args.max_iter,
                            threads=args.probe_threads)
    result = _header("linear-probe", lp.PROTOCOL_ID, ctx, spec.name, metric)
    result.update({
        "metrics": probe.metrics,
        "data": {"root": str(root), **manifests},
        "probe": {**info, "C": probe.C, "lambda": 1.0 / probe.C, "refit": args.refit, "max_iter": args.max_iter,
                  "converged": probe.converged, "selection_metric": metric,
                  "sweep": [{"C": c, "val_score": s} for c, s in probe.sweep],
                  "features": "image_encoder.forward_features (pooled, before the projection)"},
        "classnames": list(classnames),
    })
    return result, {"scores": probe.test_scores, "targets": test[1], "classnames": classnames}


def run_few_shot(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """k-shot linear probes over seeds: mean and std per k."""
    args = ctx.args
    train, val, test, classnames, info, manifests = _probe_splits(ctx, spec, root)
    pool = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    metric = spec.metric
    metrics, stds, per_k = {}, {}, {}
    for k in tqdm(args.shots, desc="shots", disable=args.quiet):
        res = lp.few_shot_probe(pool, test, k, list(args.seeds), metric, len(classnames), args.max_iter,
                                args.probe_threads)
        for name in res.mean:
            metrics[f"{k}shot_{name}"] = res.mean[name]
            stds[f"{k}shot_{name}"] = res.std[name]
        per_k[str(k)] = [{"seed": s, "C": r.C, "metrics": r.metrics} for s, r in zip(res.seeds, res.per_seed)]
    result = _header("few-shot", lp.FEW_SHOT_PROTOCOL_ID, ctx, spec.name, metric)
    result.update({
        "metrics": metrics,
        "metrics_std": stds,
        "data": {"root": str(root), **manifests},
        "probe": {**info, "shots": list(args.shots), "max_iter": args.max_iter, "per_shot": per_k,
                  "pool": "train + val (shots and the sweep's validation shots are drawn from it)"},
        "classnames": list(classnames),
    })
    return result, {}


def run_retrieval(ctx: _Context, name: str, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Zero-shot image-text retrieval on a caption file's split."""
    args = ctx.args
    if args.captions is None:
        raise SystemExit("florence eval retrieval: --captions FILE (Karpathy JSON or image,caption CSV) is required")
    path = Path(args.captions)
    pairs = _read_pairs(path, root, args.split)
    missing = [p for p in pairs.image_paths if not Path(p).is_file()]
    if missing:
        raise dsets.DatasetNotFound(f"{missing[0]}: image listed in {path} is missing ({len(missing)} missing)")
    targets = np.arange(len(pairs.image_paths))  # image index: the captions refer to images by it
    split = dsets.EvalSplit(dsets.ImageList(pairs.image_paths, targets, ctx.transform), targets, [],
                            [path, *pairs.image_paths])
    manifest = ctx.manifest(split)
    pooled, _ = ctx.features(split, f"retrieval-{name}-{args.split}", manifest)
    image_embeds = feats.project(ctx.model, pooled)  # N_img, D
    with tqdm(total=len(pairs.captions), desc="captions", unit="txt", disable=args.quiet) as bar, ctx.autocast():
        text_embeds = rt.encode_captions(ctx.model, pairs.captions, args.batch_size, ctx.device, bar.update).numpy()
    similarity = image_embeds @ text_embeds.T  # N_img, N_txt
    result = _header("retrieval", RETRIEVAL_PROTOCOL_ID, ctx, name, "R@K")
    result.update({
        "metrics": rt.recall_at_k(similarity, pairs.text_to_image),
        "data": {"root": str(root), "captions": str(path), "split": args.split,
                 "num_images": len(pairs.image_paths), "num_captions": len(pairs.captions),
                 "test": manifest},
    })
    return result, {"similarity": similarity, "pairs": pairs}


def _read_pairs(path: Path, root: Path, split: str) -> rt.CaptionSet:
    if path.suffix == ".json":
        return rt.load_karpathy_json(path, root, split)
    return rt.load_caption_csv(path, root)


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune the bundle on the training pairs; returns the record that goes into the result."""
    from florence.bundle import bundle_sha256
    from florence.benchmarks.finetune_retrieval import FinetuneRecipe, finetune_retrieval

    if args.data_root is None or (args.captions is None and args.train_captions is None):
        raise SystemExit("florence eval retrieval-finetune: --data-root and --captions (or --train-captions) needed")
    root = Path(args.data_root)
    if args.train_captions is not None:
        pairs = rt.load_caption_csv(args.train_captions, root)
    else:
        parts = [_read_pairs(Path(args.captions), root, s) for s in args.train_splits]
        offsets = np.cumsum([0] + [len(p.image_paths) for p in parts[:-1]])
        pairs = rt.CaptionSet([i for p in parts for i in p.image_paths], [c for p in parts for c in p.captions],
                              np.concatenate([p.text_to_image + o for p, o in zip(parts, offsets)]), parts[0].source)
    recipe = FinetuneRecipe(lr=args.ft_lr, batch_size=args.ft_batch_size, epochs=args.ft_epochs, steps=args.ft_steps,
                            warmup_steps=args.ft_warmup_steps, precision=args.precision, seed=args.seeds[0])
    run_dir = Path(args.output) / f"finetune_{args.dataset}"
    trained = finetune_retrieval(args.model, pairs, run_dir, recipe)
    return {"base_model": {"path": str(args.model), "sha256": bundle_sha256(args.model)},
            "bundle": str(trained.final_dir), "run_dir": str(run_dir), "recipe": vars(recipe),
            "train_pairs": len(pairs.captions), "train_images": len(pairs.image_paths),
            "final_loss": trained.losses[max(trained.losses)] if trained.losses else None}


def result_path(output: str | Path, result: dict[str, Any]) -> Path:
    """``<output>/<task>_<dataset>.json`` (task with ``-`` as ``_``); creates ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{result['task'].replace('-', '_')}_{result['dataset']}.json"


def _json_default(value: Any):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _pictures(result: dict[str, Any], arrays: dict[str, Any], json_path: Path) -> list[Path]:
    written = []
    if "targets" in arrays and np.asarray(arrays["targets"]).ndim == 1:
        png = json_path.with_suffix(".confusion.png")
        title = f"{result['task']} {result['dataset']}: top-1 {100 * result['metrics']['top1']:.2f}%"
        plots.confusion_matrix_png(arrays["targets"], np.asarray(arrays["scores"]).argmax(1), arrays["classnames"],
                                   png, title=title)
        written.append(png)
    if "similarity" in arrays:
        png = json_path.with_suffix(".retrieval.png")
        plots.retrieval_png(arrays["similarity"], arrays["pairs"], png,
                            title=f"text->image top-5, {result['dataset']}")
        written.append(png)
    return written


def evaluate(args: argparse.Namespace, model=None, model_hash: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run one protocol; ``model`` / ``model_hash`` default to the bundle at ``args.model``. Returns the JSON path."""
    start = time.perf_counter()
    finetune = None
    if args.task == "retrieval-finetune":
        finetune = run_finetune(args)
        args.model, model = finetune["bundle"], None
    if model is None:
        from florence.bundle import bundle_sha256, from_pretrained

        model = from_pretrained(args.model, map_location=args.device)
        model_hash = bundle_sha256(args.model)
    model.eval()
    if args.task in DUAL_ENCODER_TASKS:
        feats.require_dual_encoder(model, f"florence eval {args.task}")
    ctx = _Context(model, model_hash or "unhashed", str(args.model), args)
    if args.task in ("retrieval", "retrieval-finetune"):
        if args.data_root is None:
            raise SystemExit(f"florence eval {args.task}: --data-root (the image root) is required")
        result, arrays = run_retrieval(ctx, args.dataset, Path(args.data_root))
        if finetune is not None:
            from florence.benchmarks.finetune_retrieval import FINETUNE_PROTOCOL_ID

            result.update({"task": "retrieval-finetune", "protocol": FINETUNE_PROTOCOL_ID, "finetune": finetune})
    else:
        spec = dsets.get_spec(args.dataset, args.classnames)
        root = spec.check(_resolve_root(spec, args.data_root))
        runner = {"zeroshot": run_zeroshot, "linear-probe": run_linear_probe, "few-shot": run_few_shot}[args.task]
        result, arrays = runner(ctx, spec, root)
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    path = result_path(args.output, result)
    if not args.no_plots:
        result["pictures"] = [str(p) for p in _pictures(result, arrays, path)]
    path.write_text(json.dumps(result, indent=2, default=_json_default))
    return path, result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, result = evaluate(args)
    except (dsets.DatasetNotFound, FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        print(f"florence eval: {err}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["metrics"].items())
    print(f"{result['task']} {result['dataset']}: {shown}")
    print(f"result: {path}")
    for picture in result.get("pictures", []):
        print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
