"""``florence eval TASK --model DIR --dataset NAME ...``: zeroshot, linear-probe, few-shot, retrieval,
retrieval-finetune, classify (``florence eval TASK --help`` lists each task's own flags); ``florence eval detection``
(COCO-format detection, its own flags) is ``florence.benchmarks.detection_cli``, ``florence eval vqa`` (VQAv2-format
questions, the official VQA accuracy, its own flags) ``florence.benchmarks.vqa_cli``, ``florence eval action``
(multi-view action recognition) ``florence.benchmarks.video_cli`` and ``florence eval video-retrieval`` (zero-shot
text->video retrieval) ``florence.benchmarks.video_retrieval_cli``.

``retrieval-finetune`` first continues UniCL training of the model on the training pairs (Karpathy ``--train-splits``
of the same caption file, or ``--train-captions CSV``) with the engine (``florence.benchmarks.finetune_retrieval``,
Florence's recipe unless ``--ft-*`` options say otherwise), then evaluates the fine-tuned bundle like ``retrieval``.
``classify`` evaluates an image classifier bundle (an image tower with a linear head whose classes follow the
dataset's label order) with protocol ``classifier-head-v1``.

Each run writes ``<output>/<task>_<dataset>.json`` with:

- ``metrics``: fractions in [0, 1] (``top1``, ``top5``, ``mean_per_class`` or ``map_11point``; ``image_to_text_R@K``
  and ``text_to_image_R@K`` for retrieval; ``<k>shot_<metric>`` means for few-shot, stds in ``metrics_std``);
- ``trivial_metrics``: the metrics that are 1.0 whatever the model (top-5 with at most 5 classes, R@K with at most K
  candidates), also marked on the console;
- ``bad_samples``: per split read, the ``--on-bad-sample`` policy, how many images were skipped as undecodable and
  how many evaluated, counts by reason and the skipped files; the metrics cover the good images only;
- ``protocol`` (id string), ``paper_metric``, ``model`` (bundle path and SHA-256 of its manifest; for
  ``--model open_clip:ARCH:WEIGHTS`` / ``hf:DIR`` the spelling and the SHA-256 of its weights files and configuration,
  ``florence.backbone.foreign``), ``data``
  (manifest: file count and hash of each split read), ``templates`` (set name, count, SHA-256 of templates and class
  names), ``seeds`` (those the task uses), ``precision``, ``versions`` (python, torch, ... ), ``args`` (the task's
  options) and protocol details (the probe's ``converged`` flag is also printed when false);

plus a confusion-matrix PNG (classification) or a retrieval PNG next to it. Features and class embeddings are cached
under ``<output>/cache`` (``--cache-dir``): pooled features (probes, retrieval) keyed by model hash, transform, split
(with the hash of its data manifest, so another data root or caption file is never served stale features) and
precision; class embeddings by model hash, templates + class names and precision.

Errors a user can fix (``florence.errors.FlorenceError``: a missing dataset file, a bad option, a bad sample under
``--on-bad-sample raise``) end with one line on stderr and exit status 2; anything else is a bug and keeps its
traceback.
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
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from florence.adapters import features as feats
from florence.adapters import linear_probe as lp
from florence.adapters import retrieval as rt
from florence.adapters import zeroshot as zs
from florence.adapters.prompt_templates import DATASET_TEMPLATES, get_template_set
from florence.benchmarks import datasets as dsets
from florence.benchmarks import detection_cli, video_cli, video_retrieval_cli, vqa_cli
from florence.benchmarks import plots
from florence.data.bad_samples import BadSampleError
from florence.data.eval_loader import EvalLoader, format_bad_report, map_batches
from florence.data.source_dataset import ImageList
from florence.data.templates import load_templates
from florence.data.transforms import build_transform
from florence.engine.metrics import library_versions
from florence.engine.precision import build_precision
from florence.errors import FlorenceError

TASKS = ("zeroshot", "linear-probe", "few-shot", "retrieval", "retrieval-finetune", "classify")
ZEROSHOT_PROTOCOL_ID = "clip-prompt-ensemble-v1"
RETRIEVAL_PROTOCOL_ID = "clip-benchmark-recall-any-caption-v1"
CLASSIFY_PROTOCOL_ID = "classifier-head-v1"
DUAL_ENCODER_TASKS = ("zeroshot", "retrieval", "retrieval-finetune")
CLASSIFICATION_TASKS = ("zeroshot", "linear-probe", "few-shot", "classify")
PROBE_TASKS = ("linear-probe", "few-shot")
RETRIEVAL_TASKS = ("retrieval", "retrieval-finetune")
TASK_HELP = {
    "zeroshot": "zero-shot classification with a dual encoder (CLIP prompt ensemble)",
    "linear-probe": "CLIP linear probe on frozen pooled image features (L-BFGS, C swept on a validation split)",
    "few-shot": "k-shot linear probes over seeds",
    "retrieval": "zero-shot image-text retrieval (R@1/5/10 both ways)",
    "retrieval-finetune": "continue UniCL training on the training pairs, then evaluate retrieval",
    "classify": "an image classifier bundle (image tower + linear head): top-1, top-5, mean per class",
}


class EvalError(FlorenceError, ValueError):
    """A command-line option that cannot work (a missing required option, an unknown template set, a model of the
    wrong kind for the task); the message names the option."""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


# Task flags: (the tasks that use it, with its help text there; the flag; argparse keywords). Each sub-command shows
# its own flags; it also accepts the others, hidden, so that command lines written before the sub-commands had their
# own help keep working (a hidden flag given a value is reported as ignored).
_TASK_FLAGS: list[tuple[dict[str, str], tuple[str, ...], dict]] = [
    ({**{t: "one of " + ", ".join(dsets.build_specs()) for t in CLASSIFICATION_TASKS},
      **{t: "a name for the result file (e.g. flickr30k, coco)" for t in RETRIEVAL_TASKS}},
     ("--dataset",), dict(required=True)),
    ({**{t: "dataset root (Fashion-MNIST defaults to /usr/share/datasets/fashion-mnist)" for t in CLASSIFICATION_TASKS},
      **{t: "image root: caption-file image paths are relative to it" for t in RETRIEVAL_TASKS}},
     ("--data-root",), dict(default=None)),
    ({t: "ImageNet class-name file, one a line (default: open_clip's CLIP names)" for t in CLASSIFICATION_TASKS},
     ("--classnames",), dict(default=None)),
    ({"zeroshot": "template set name (imagenet, cifar10, ...) or a template file; default: the dataset's CLIP set "
                  "(the 80 ImageNet templates for imagenet, fashion_mnist and imagefolder)"},
     ("--templates",), dict(default=None)),
    ({t: "seed of the --train-limit subset and of the validation split carved from train" for t in PROBE_TASKS},
     ("--split-seed",), dict(type=int, default=0)),
    ({t: "use a stratified seeded subset of N training images" for t in PROBE_TASKS},
     ("--train-limit",), dict(type=int, default=None)),
    ({t: "fraction of train carved out as validation where the dataset has no official val split" for t in
      PROBE_TASKS}, ("--val-fraction",), dict(type=_fraction, default=0.2)),
    ({"linear-probe": "data the classifier is refitted on with the chosen C"},
     ("--refit",), dict(choices=("train+val", "train"), default="train+val")),
    ({t: "L-BFGS iterations (CLIP protocol: 1000)" for t in PROBE_TASKS},
     ("--max-iter",), dict(type=int, default=1000)),
    ({t: "BLAS/OpenMP threads for the logistic-regression fits (default: the libraries' own; 1 is much faster on a "
         "machine shared with other busy processes)" for t in PROBE_TASKS},
     ("--probe-threads",), dict(type=int, default=None)),
    ({"few-shot": "shots per class, one probe per value"},
     ("--shots",), dict(type=int, nargs="+", default=[1, 5, 10, 20, 50])),
    ({"few-shot": "few-shot seeds", "retrieval-finetune": "training seed (the first value)"},
     ("--seeds",), dict(type=int, nargs="+", default=[0, 1, 2])),
    ({t: "Karpathy-style JSON or CSV (image,caption)" for t in RETRIEVAL_TASKS}, ("--captions",), dict(default=None)),
    ({t: "Karpathy split to evaluate" for t in RETRIEVAL_TASKS}, ("--split",), dict(default="test")),
    ({"retrieval-finetune": "Karpathy splits to train on (COCO: train restval)"},
     ("--train-splits",), dict(nargs="+", default=["train"])),
    ({"retrieval-finetune": "training pairs CSV instead of --train-splits"}, ("--train-captions",), dict(default=None)),
    ({"retrieval-finetune": "training epochs"}, ("--ft-epochs",), dict(type=float, default=12.0)),
    ({"retrieval-finetune": "optimizer steps (overrides --ft-epochs)"}, ("--ft-steps",), dict(type=int, default=None)),
    ({"retrieval-finetune": "peak learning rate"}, ("--ft-lr",), dict(type=float, default=2e-5)),
    ({"retrieval-finetune": "global batch"}, ("--ft-batch-size",), dict(type=int, default=3072)),
    ({"retrieval-finetune": "warm-up steps"}, ("--ft-warmup-steps",), dict(type=int, default=200)),
]


def _common_parser() -> argparse.ArgumentParser:
    """The flags every task takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", required=True,
                   help="checkpoint bundle directory (florence.from_pretrained), or another library's weights: "
                   "open_clip:ARCH[@TAG][:WEIGHTS] (ARCH an open_clip model name, TAG its pretrained tag, or an "
                   "open_clip_config.json) or hf:DIR (a "
                   "transformers CLIPModel / VisionTextDualEncoderModel directory)")
    p.add_argument("--output", default="eval_results", help="directory for the JSON results and pictures")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--on-bad-sample", choices=("skip", "raise"), default="skip",
                   help="an image that cannot be decoded: skip it (counted, with file and reason, in the output and "
                   "the JSON; metrics on the good images) or stop with an error naming the file")
    p.add_argument("--cache-dir", default=None, help="feature / class-embedding cache (default <output>/cache)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def build_parser() -> argparse.ArgumentParser:
    """``florence eval TASK ...``: one sub-command per task, each with its own flags in its ``--help``."""
    p = argparse.ArgumentParser(prog="florence eval", description="Evaluate a model bundle with one protocol; "
                                "'florence eval TASK --help' lists that task's flags; 'florence eval detection "
                                "--help' those of COCO detection, 'florence eval vqa --help' those of VQA, "
                                "'florence eval action --help' those of action recognition, 'florence eval "
                                "video-retrieval --help' those of text-video retrieval.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK", title="tasks")
    common = _common_parser()
    for task in TASKS:
        sub = tasks.add_parser(task, parents=[common], help=TASK_HELP[task], description=TASK_HELP[task])
        for helps, flags, kwargs in _TASK_FLAGS:
            if task in helps:
                sub.add_argument(*flags, help=helps[task], **kwargs)
            else:
                sub.add_argument(*flags, help=argparse.SUPPRESS, **{**kwargs, "required": False})
    return p


def _task_dests(task: str) -> set[str]:
    """The option names (``args`` attributes) that apply to ``task``."""
    common = set(vars(_common_parser().parse_args(["--model", "-"])))
    own = {flags[0].lstrip("-").replace("-", "_") for helps, flags, _ in _TASK_FLAGS if task in helps}
    return common | own | {"task"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a ``florence eval`` command line; a flag of another task given a value is reported as ignored."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for helps, flags, kwargs in _TASK_FLAGS:
        dest = flags[0].lstrip("-").replace("-", "_")
        if args.task not in helps and getattr(args, dest) != kwargs.get("default"):
            users = ", ".join(helps)
            print(f"florence eval {args.task}: note: {flags[0]} applies to {users} only; ignored", file=sys.stderr)
    return args


class _Context:
    """What every protocol needs: the model, its hash, the run options."""

    def __init__(self, model, model_hash: str, model_path: str, args: argparse.Namespace):
        self.model, self.model_hash, self.model_path, self.args = model, model_hash, model_path, args
        self.device = torch.device(args.device)
        self.cache_dir = None if args.no_cache else Path(args.cache_dir or Path(args.output) / "cache")
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

    def eval_loader(self, dataset: Dataset, name: str) -> EvalLoader:
        """Batches of ``dataset`` under the ``--on-bad-sample`` policy."""
        return EvalLoader(dataset, batch_size=self.args.batch_size, num_workers=self.args.workers,
                          on_bad_sample=self.args.on_bad_sample, name=name)

    def features(self, split: dsets.EvalSplit, split_key: str, manifest: dict
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Cached pooled ``(features (N, 8C), targets (N,), bad-sample report)`` of a split's good images; the cache
        key is ``split_key`` plus the hash of the split's data manifest (``dsets.data_manifest``). The bad-sample
        report is kept beside the cached arrays, so a cached run reports the same skips (and ``--on-bad-sample raise``
        still stops on them)."""
        split_key = f"{split_key}-{manifest['sha256'][:16]}"
        loader = self.eval_loader(split.dataset, split_key)

        def compute():
            with tqdm(total=len(split.dataset), desc=f"images {split_key}", unit="img", disable=self.args.quiet) as bar:
                return feats.extract(self.model, loader, self.device, self.args.precision, progress=bar.update)

        x, y, from_cache = feats.cached_features(self.cache_dir, self.model_hash, self.transform_key, split_key,
                                                 self.args.precision, compute)
        kept_report = None  # <cache file>.bad.json: the skips of the run that filled the cache
        if self.cache_dir is not None:
            npz = feats.cache_path(self.cache_dir, self.model_hash, self.transform_key, split_key, self.args.precision)
            kept_report = npz.with_name(npz.name.removesuffix(".npz") + ".bad.json")
        if not from_cache:
            report = loader.report()
            if kept_report is not None:
                kept_report.write_text(json.dumps(report))
            return x, y, report
        report = {"skipped": 0, "by_reason": {}, "samples": []}
        if kept_report.is_file():
            report = json.loads(kept_report.read_text())
        report.update(policy=self.args.on_bad_sample, evaluated=int(len(y)))
        if report["skipped"] and self.args.on_bad_sample == "raise":
            first = report["samples"][0]
            raise BadSampleError(f"bad sample in source {split_key!r}: {first['file']}: {first['reason']}")
        return x, y, report


def _subset(split: dsets.EvalSplit, idx: np.ndarray) -> dsets.EvalSplit:
    return dsets.EvalSplit(Subset(split.dataset, idx.tolist()), split.targets[idx], split.classnames, split.files)


def _header(task: str, protocol: str, ctx: _Context, spec_name: str, metric: str) -> dict[str, Any]:
    args = ctx.args
    seeds: dict[str, Any] = {}
    if task in PROBE_TASKS:
        seeds["split"] = args.split_seed
    if task == "few-shot":
        seeds["few_shot"] = list(args.seeds)
    if task == "retrieval-finetune":
        seeds["finetune"] = args.seeds[0]
    dests = _task_dests(task)
    return {
        "task": task,
        "dataset": spec_name,
        "protocol": protocol,
        "paper_metric": metric,
        "model": {"path": ctx.model_path, "sha256": ctx.model_hash},
        "precision": args.precision,
        "seeds": seeds,
        "versions": library_versions(),
        "args": {k: v for k, v in vars(args).items() if k in dests},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _templates(args: argparse.Namespace, default_set: str) -> tuple[str, tuple[str, ...]]:
    choice = args.templates or default_set
    if Path(choice).is_file():
        return str(choice), load_templates(choice)
    known = ("imagenet", *sorted(DATASET_TEMPLATES))
    if choice not in known:
        raise EvalError(f"--templates {choice!r}: neither a file nor a template set ({', '.join(known)})")
    return choice, get_template_set(choice)


def _resolve_root(spec: dsets.DatasetSpec, data_root: str | None) -> Path:
    if data_root is not None:
        return Path(data_root)
    if spec.name == "fashion_mnist":
        from florence.data.sources import FASHION_MNIST_DIR

        return Path(FASHION_MNIST_DIR)
    raise EvalError(f"--data-root is required for {spec.name} (expected layout: {spec.layout})")


def run_zeroshot(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Zero-shot classification on the test split with ``florence.adapters.zeroshot.evaluate_zeroshot`` (the
    evaluator the training engine's end-of-run check uses too). Returns ``(result JSON, arrays for pictures)``."""
    args = ctx.args
    test = spec.load(root, "test", ctx.transform)
    set_name, templates = _templates(args, spec.template_set)
    classnames = test.classnames
    cache = zs.ClassEmbeddingCache(ctx.cache_dir, ctx.model_hash, args.precision) if ctx.cache_dir else None
    ev = zs.evaluate_zeroshot(ctx.model, test.dataset, classnames, templates, batch_size=args.batch_size,
                              device=ctx.device, autocast=ctx.autocast, on_bad_sample=args.on_bad_sample,
                              num_workers=args.workers, cache=cache, progress=not args.quiet,
                              name=f"{spec.name} test")
    manifest = ctx.manifest(test)
    result = _header("zeroshot", ZEROSHOT_PROTOCOL_ID, ctx, spec.name, spec.metric)
    result.update({
        "metrics": ev.metrics,
        "trivial_metrics": ev.trivial_metrics,
        "data": {"root": str(root), "test": manifest, "num_test": int(len(ev.targets))},
        "bad_samples": {"test": ev.bad_samples},
        "templates": {"set": set_name, "count": len(templates), "sha256": zs.template_hash(templates, classnames)},
        "classnames": list(classnames),
        "class_embeddings_from_cache": ev.class_embeddings_from_cache,
    })
    return result, {"scores": ev.scores, "targets": ev.targets, "classnames": classnames}


def run_classify(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An image classifier bundle (``model(images)`` -> logits ``(B, num_classes)``, head classes in the dataset's
    label order) on the test split: top-1, top-5, mean-per-class (or 11-point mAP for multi-label data)."""
    args, model = ctx.args, ctx.model
    if hasattr(model, "encode_text"):
        raise EvalError(f"classify: {ctx.model_path} is a dual encoder without a classifier head; use zeroshot, or "
                        "fine-tune a classifier from it")
    if getattr(model, "num_classes", None) == 0:
        raise EvalError(f"classify: {ctx.model_path} is an image tower without a classifier head (num_classes 0); "
                        "use linear-probe, or fine-tune a classifier from it")
    test = spec.load(root, "test", ctx.transform)
    loader = ctx.eval_loader(test.dataset, f"{spec.name} test")
    with tqdm(total=len(test.dataset), desc="images", unit="img", disable=args.quiet) as bar:
        logits, targets = map_batches(model, loader, device=ctx.device, autocast=ctx.autocast, progress=bar.update)
    classnames = test.classnames
    if logits.ndim != 2 or logits.shape[1] != len(classnames):
        raise EvalError(f"classify: the model at {ctx.model_path} gives outputs of shape {tuple(logits.shape[1:])} per "
                        f"image, {spec.name} has {len(classnames)} classes: the head must have one logit per class")
    head_names = getattr(model, "class_names", None)
    head_names = [n if isinstance(n, str) else n[0] for n in head_names] if head_names else None
    result = _header("classify", CLASSIFY_PROTOCOL_ID, ctx, spec.name, spec.metric)
    result.update({
        "metrics": zs.score_metrics(logits, targets),
        "trivial_metrics": zs.trivial_classification_metrics(len(classnames)) if targets.ndim == 1 else [],
        "data": {"root": str(root), "test": ctx.manifest(test), "num_test": int(len(targets))},
        "bad_samples": {"test": loader.report()},
        "classnames": list(classnames),
        "head_class_names": head_names,
        "class_names_match": None if head_names is None else head_names == list(classnames),
    })
    return result, {"scores": logits, "targets": targets, "classnames": classnames}


def _probe_splits(ctx: _Context, spec: dsets.DatasetSpec, root: Path):
    """Train / val / test features for probing, with the split bookkeeping for the result."""
    args = ctx.args
    train = spec.load(root, "train", ctx.transform)
    info: dict[str, Any] = {"train_limit": args.train_limit}
    if args.train_limit is not None:
        keep = dsets.stratified_subset(train.targets, args.train_limit, seed=args.split_seed)
        train = _subset(train, keep)
    limit_key = f"-limit{args.train_limit}-seed{args.split_seed}" if args.train_limit is not None else ""
    manifests, bad = {"train": ctx.manifest(train)}, {}
    train_x, train_y, bad["train"] = ctx.features(train, f"{spec.name}-train{limit_key}", manifests["train"])
    if spec.has_val(root):
        val = spec.load(root, "val", ctx.transform)
        manifests["val"] = ctx.manifest(val)
        val_x, val_y, bad["val"] = ctx.features(val, f"{spec.name}-val", manifests["val"])
        info["val_source"] = "official"
    else:
        fit_idx, val_idx = dsets.carve_validation(train_y, args.val_fraction, seed=args.split_seed)
        val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[fit_idx], train_y[fit_idx]
        info["val_source"] = f"carved from train: stratified fraction {args.val_fraction}, seed {args.split_seed}"
    test = spec.load(root, "test", ctx.transform)
    manifests["test"] = ctx.manifest(test)
    test_x, test_y, bad["test"] = ctx.features(test, f"{spec.name}-test", manifests["test"])
    info.update({"num_train": int(len(train_y)), "num_val": int(len(val_y)), "num_test": int(len(test_y)),
                 "feature_dim": int(train_x.shape[1])})
    return (train_x, train_y), (val_x, val_y), (test_x, test_y), test.classnames, info, manifests, bad


def run_linear_probe(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLIP linear probe: sweep C on val, refit, test."""
    args = ctx.args
    train, val, test, classnames, info, manifests, bad = _probe_splits(ctx, spec, root)
    metric = spec.metric
    probe = lp.linear_probe(train, val, test, metric, len(classnames), refit=args.refit, max_iter=args.max_iter,
                            threads=args.probe_threads)
    result = _header("linear-probe", lp.PROTOCOL_ID, ctx, spec.name, metric)
    result.update({
        "metrics": probe.metrics,
        "trivial_metrics": zs.trivial_classification_metrics(len(classnames)) if test[1].ndim == 1 else [],
        "data": {"root": str(root), **manifests},
        "bad_samples": bad,
        "probe": {**info, "C": probe.C, "lambda": 1.0 / probe.C, "refit": args.refit, "max_iter": args.max_iter,
                  "converged": probe.converged, "selection_metric": metric,
                  "sweep": [{"C": c, "val_score": s} for c, s in probe.sweep],
                  "features": "image tower forward_head(forward_features, pre_logits=True) (pooled, before the projection)"},
        "classnames": list(classnames),
    })
    return result, {"scores": probe.test_scores, "targets": test[1], "classnames": classnames}


def run_few_shot(ctx: _Context, spec: dsets.DatasetSpec, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """k-shot linear probes over seeds: mean and std per k."""
    args = ctx.args
    train, val, test, classnames, info, manifests, bad = _probe_splits(ctx, spec, root)
    pool = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    metric = spec.metric
    metrics, stds, per_k, trivial = {}, {}, {}, []
    for k in tqdm(args.shots, desc="shots", disable=args.quiet):
        res = lp.few_shot_probe(pool, test, k, list(args.seeds), metric, len(classnames), args.max_iter,
                                args.probe_threads)
        for name in res.mean:
            metrics[f"{k}shot_{name}"] = res.mean[name]
            stds[f"{k}shot_{name}"] = res.std[name]
        per_k[str(k)] = [{"seed": s, "C": r.C, "metrics": r.metrics, "converged": r.converged}
                         for s, r in zip(res.seeds, res.per_seed)]
        trivial += zs.trivial_classification_metrics(len(classnames), prefix=f"{k}shot_")
    result = _header("few-shot", lp.FEW_SHOT_PROTOCOL_ID, ctx, spec.name, metric)
    result.update({
        "metrics": metrics,
        "metrics_std": stds,
        "trivial_metrics": trivial,
        "data": {"root": str(root), **manifests},
        "bad_samples": bad,
        "probe": {**info, "shots": list(args.shots), "max_iter": args.max_iter, "per_shot": per_k,
                  "converged": all(r["converged"] for runs in per_k.values() for r in runs),
                  "pool": "train + val (shots and the sweep's validation shots are drawn from it)"},
        "classnames": list(classnames),
    })
    return result, {}


def run_retrieval(ctx: _Context, name: str, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Zero-shot image-text retrieval on a caption file's split. Images skipped as bad leave with their captions."""
    args = ctx.args
    if args.captions is None:
        raise EvalError("--captions FILE (Karpathy JSON or image,caption CSV) is required")
    path = Path(args.captions)
    pairs = _read_pairs(path, root, args.split)
    missing = [p for p in pairs.image_paths if not Path(p).is_file()]
    if missing:
        raise dsets.DatasetNotFound(f"{missing[0]}: image listed in {path} is missing ({len(missing)} missing)")
    targets = np.arange(len(pairs.image_paths))  # image index: the captions refer to images by it
    split = dsets.EvalSplit(ImageList(pairs.image_paths, targets, ctx.transform), targets, [],
                            [path, *pairs.image_paths])
    manifest = ctx.manifest(split)
    pooled, kept, bad = ctx.features(split, f"retrieval-{name}-{args.split}", manifest)
    if len(kept) < len(pairs.image_paths):
        pairs = pairs.keep_images(kept)  # the good images and their captions
    image_embeds = feats.project(ctx.model, pooled)  # N_img, D
    with tqdm(total=len(pairs.captions), desc="captions", unit="txt", disable=args.quiet) as bar, ctx.autocast():
        text_embeds = rt.encode_captions(ctx.model, pairs.captions, args.batch_size, ctx.device, bar.update).numpy()
    similarity = image_embeds @ text_embeds.T  # N_img, N_txt
    result = _header("retrieval", RETRIEVAL_PROTOCOL_ID, ctx, name, "R@K")
    result.update({
        "metrics": rt.recall_at_k(similarity, pairs.text_to_image),
        "trivial_metrics": rt.trivial_recall_metrics(len(pairs.image_paths), len(pairs.captions)),
        "data": {"root": str(root), "captions": str(path), "split": args.split,
                 "num_images": len(pairs.image_paths), "num_captions": len(pairs.captions),
                 "test": manifest},
        "bad_samples": {"test": bad},
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
        raise EvalError("--data-root and --captions (or --train-captions) are required")
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
    """Run one protocol; ``model`` / ``model_hash`` default to the bundle (or ``open_clip:`` / ``hf:`` spelling) at
    ``args.model``. Returns the JSON path."""
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
        zs.require_dual_encoder(model, f"florence eval {args.task}")
    ctx = _Context(model, model_hash or "unhashed", str(args.model), args)
    if args.task in RETRIEVAL_TASKS:
        if args.data_root is None:
            raise EvalError("--data-root (the image root) is required")
        result, arrays = run_retrieval(ctx, args.dataset, Path(args.data_root))
        if finetune is not None:
            from florence.benchmarks.finetune_retrieval import FINETUNE_PROTOCOL_ID

            result.update({"task": "retrieval-finetune", "protocol": FINETUNE_PROTOCOL_ID, "finetune": finetune})
    else:
        spec = dsets.get_spec(args.dataset, args.classnames)
        root = spec.check(_resolve_root(spec, args.data_root))
        runner = {"zeroshot": run_zeroshot, "linear-probe": run_linear_probe, "few-shot": run_few_shot,
                  "classify": run_classify}[args.task]
        result, arrays = runner(ctx, spec, root)
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    path = result_path(args.output, result)
    if not args.no_plots:
        result["pictures"] = [str(p) for p in _pictures(result, arrays, path)]
    path.write_text(json.dumps(result, indent=2, default=_json_default))
    return path, result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What the console shows of a result: the metrics (trivial ones marked), convergence of the probes, skips."""
    trivial = set(result.get("trivial_metrics", []))
    shown = ", ".join(f"{k} {100 * v:.2f}%" + (" (trivial)" if k in trivial else "")
                      for k, v in result["metrics"].items())
    lines = [f"{result['task']} {result['dataset']}: {shown}"]
    if trivial:
        size = (f"{len(result['classnames'])} classes" if result.get("classnames")
                else f"{result['data'].get('num_images')} images, {result['data'].get('num_captions')} captions")
        lines.append(f"note: trivial metrics (1.0 whatever the model with {size}): {', '.join(sorted(trivial))}")
    probe = result.get("probe", {})
    if probe.get("converged") is False:
        lines.append(f"warning: converged: false: an L-BFGS fit stopped at --max-iter {probe['max_iter']} before "
                     "converging; the figures may change with a larger --max-iter")
    for split, report in result.get("bad_samples", {}).items():
        line = format_bad_report(report)
        if line:
            lines.append(f"{split}: {line}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["detection"]:  # COCO-format data, its own flags (florence.benchmarks.detection_cli)
        return detection_cli.main(argv[1:])
    if argv[:1] == ["vqa"]:  # VQAv2-format questions, its own flags (florence.benchmarks.vqa_cli)
        return vqa_cli.main(argv[1:])
    if argv[:1] == ["action"]:  # videos, multi-view testing (florence.benchmarks.video_cli)
        return video_cli.eval_main(argv[1:])
    if argv[:1] == ["video-retrieval"]:  # zero-shot text->video retrieval (florence.benchmarks.video_retrieval_cli)
        return video_retrieval_cli.main(argv[1:])
    args = parse_args(argv)
    try:
        path, result = evaluate(args)
    except FlorenceError as err:  # a user-fixable problem: one line; anything else is a bug and keeps its traceback
        print(f"florence eval {args.task}: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    print(f"result: {path}")
    for picture in result.get("pictures", []):
        print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
