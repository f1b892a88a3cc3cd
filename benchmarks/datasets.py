"""Evaluation dataset specifications: the paper's 12 zero-shot / 11 linear-probe datasets, Fashion-MNIST, any
ImageFolder. Local files only: nothing is downloaded, and a missing file fails with ``DatasetNotFound`` naming the
path and the expected layout.

Each ``DatasetSpec`` knows its metric (CLIP's convention, SPEC §8.2), its prompt template set, the on-disk layout of
the standard distribution under ``--data-root``, and how to read one split as ``EvalSplit`` (a dataset of
``(image tensor, target)`` pairs, the targets as an array, the class names). The standard layouts are torchvision's
(read with ``torchvision.datasets`` and ``download=False``):

| name | layout under the data root | splits (train / val / test) |
|---|---|---|
| imagenet | ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` (val sorted into class folders) | train / carved / val |
| food101 | ``food-101/{images,meta}`` | train / carved / test |
| cifar10 | ``cifar-10-batches-py/`` | train / carved / test |
| cifar100 | ``cifar-100-python/`` | train / carved / test |
| sun397 | ``SUN397/ClassName.txt`` + ``SUN397/<letter>/<class>/*.jpg`` | 50 / 50 per class |
| cars | ``stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}`` | train / carved / test |
| fgvc_aircraft | ``fgvc-aircraft-2013b/data/`` | train / val / test (variant level) |
| voc2007 | ``VOCdevkit/VOC2007/{JPEGImages,ImageSets/Main}`` (trainval + test tars) | train / val / test |
| dtd | ``dtd/dtd/{images,labels}`` | train1 / val1 / test1 |
| pets | ``oxford-iiit-pet/{images,annotations}`` | trainval / carved / test |
| caltech101 | ``caltech101/101_ObjectCategories/<class>/*.jpg`` (102 incl. BACKGROUND_Google) | 30 / rest per class |
| flowers102 | ``flowers-102/{jpg,imagelabels.mat,setid.mat}`` | train / val / test |
| fashion_mnist | ``{train,t10k}-*-ubyte.gz`` (default ``/usr/share/datasets/fashion-mnist``) | train / carved / test |
| imagefolder | ``<split>/<class>/*`` for split in train, val (optional), test | train / val or carved / test |

"carved": the validation split is cut from train by ``carve_validation`` (stratified, seeded). SUN397 and Caltech-101
have no official split: a seeded (seed 0) per-class draw gives CLIP's split sizes (SUN397 50 train / 50 test images per
class, 19,850 each; Caltech-101 30 train per class, 3,060, the rest test), PROPOSAL: the images differ from CLIP's.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from florence.benchmarks import classnames as names
from florence.data.errors import DataNotFound
from florence.data.images import decode_image
from florence.data.source_dataset import ImageList
from florence.errors import FlorenceError

Transform = Callable  # PIL image -> FloatTensor (3, H, W)


class DatasetNotFound(DataNotFound):
    """A dataset file or folder is missing under the data root; the message names the path and the layout."""


class DatasetError(FlorenceError, ValueError):
    """A dataset name, class-name list or distribution that cannot be evaluated; the message says which and why."""


@dataclass
class EvalSplit:
    """One split of an evaluation dataset.

    Attributes:
        dataset: ``dataset[i] -> (image (3, H, W), target)``; target an int, or a ``(C,)`` 1/0/-1 vector (VOC).
        targets: ``(N,)`` int64 labels or ``(N, C)`` multi-label targets, aligned with ``dataset``.
        classnames: prompt-ready class names, in label order.
        files: the folders/files this split was read from (for the data manifest).
    """

    dataset: Dataset
    targets: np.ndarray
    classnames: list[str]
    files: list[Path]


@dataclass(frozen=True)
class DatasetSpec:
    """How to evaluate on one dataset.

    Attributes:
        name: the ``--dataset`` name.
        paper_name: the column name in the paper's tables (None if the paper does not report it).
        metric: ``top1``, ``mean_per_class`` or ``map_11point``.
        template_set: prompt template set name (``florence.adapters.prompt_templates.get_template_set``).
        layout: the expected files under the data root (shown in errors).
        required: paths relative to the data root that must exist.
        val_marker: a path (relative to the data root) whose presence means an official validation split exists;
            None: the validation split is always carved from train.
        reader: ``reader(root, split, transform) -> EvalSplit`` for split in ``train``, ``val``, ``test``.
    """

    name: str
    paper_name: str | None
    metric: str
    template_set: str
    layout: str
    required: tuple[str, ...]
    val_marker: str | None
    reader: Callable[[Path, str, Transform], EvalSplit]

    def check(self, root: str | Path) -> Path:
        """The data root, after checking that every required path exists (else ``DatasetNotFound``)."""
        root = Path(root)
        for rel in self.required:
            if not (root / rel).exists():
                raise DatasetNotFound(
                    f"{self.name}: missing {root / rel}; expected under --data-root {root}: {self.layout} "
                    "(florence reads local files only and downloads nothing)"
                )
        return root

    def has_val(self, root: str | Path) -> bool:
        """True if the distribution under ``root`` has an official validation split."""
        return self.val_marker is not None and (Path(root) / self.val_marker).exists()

    def load(self, root: str | Path, split: str, transform: Transform) -> EvalSplit:
        """Read ``split`` (``train``, ``val`` or ``test``) with ``transform``; ``val`` only if ``has_val(root)``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if split == "val" and not self.has_val(root):
            raise ValueError(f"{self.name} has no official validation split; carve one from train")
        return self.reader(self.check(root), split, transform)


def _labels_of(ds) -> np.ndarray:
    """Integer labels of a torchvision dataset without decoding images."""
    for attr in ("targets", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):  # StanfordCars
        return np.asarray([label for _, label in ds._samples], dtype=np.int64)
    raise TypeError(f"cannot read labels of {type(ds).__name__}")


def _spaced(classes: list[str]) -> list[str]:
    return [c.replace("_", " ").replace("/", " ").strip() for c in classes]


def _torchvision_reader(cls_name: str, folder: str, split_names: dict[str, str], fix_names=_spaced, **kwargs):
    """A reader over ``torchvision.datasets.<cls_name>(root, split=..., download=False)``."""

    def read(root: Path, split: str, transform: Transform) -> EvalSplit:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            if cls_name in ("CIFAR10", "CIFAR100"):
                ds = cls(str(root), train=split == "train", transform=transform, download=False, **kwargs)
            else:
                ds = cls(str(root), split=split_names[split], transform=transform, download=False, **kwargs)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise DatasetNotFound(f"{root / folder}: torchvision {cls_name} cannot read the {split} split "
                                  f"({str(err).split('.')[0]}); florence reads local files only and downloads "
                                  "nothing") from None
        return EvalSplit(ds, _labels_of(ds), fix_names(list(ds.classes)), [root / folder])

    return read


def _fixed_names(classnames: tuple[str, ...]):
    def fix(found: list[str]) -> list[str]:
        if len(found) != len(classnames):
            raise DatasetError(f"expected {len(classnames)} classes, the files list {len(found)}")
        return list(classnames)

    return fix


def image_folder(folder: Path, transform: Transform, what: str):
    """``torchvision.datasets.ImageFolder`` over ``folder`` whose images are read with ``decode_image`` (any mode
    becomes RGB; a corrupt or empty file is a ``BadSample`` naming it). ``what`` names the dataset in errors."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform, loader=decode_image)
    except FileNotFoundError as err:  # no class folders, or no image files in them
        raise DatasetNotFound(f"{what}: {folder}: {err}") from None


def _per_class_split(labels: np.ndarray, first: int, second: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``first`` samples of each class, then ``second`` more (all the rest if None)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a.append(idx[:first])
        b.append(idx[first:] if second is None else idx[first:first + second])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def _folder_reader(folder: str, train_per_class: int, test_per_class: int | None, fix_names):
    """Distributions without official splits (Caltech-101, SUN397): a seeded per-class train/test split."""

    def read(root: Path, split: str, transform: Transform) -> EvalSplit:
        base = root / folder
        ds = image_folder(base, transform, folder)
        labels = np.asarray(ds.targets, dtype=np.int64)
        train_idx, test_idx = _per_class_split(labels, train_per_class, test_per_class, seed=0)
        idx = train_idx if split == "train" else test_idx
        return EvalSplit(torch.utils.data.Subset(ds, idx.tolist()), labels[idx], fix_names(ds.classes), [base])

    return read


def _sun397_reader(root: Path, split: str, transform: Transform) -> EvalSplit:
    from torchvision.datasets import SUN397

    ds = SUN397(str(root), transform=transform, download=False)
    labels = _labels_of(ds)
    train_idx, test_idx = _per_class_split(labels, 50, 50, seed=0)
    idx = train_idx if split == "train" else test_idx
    return EvalSplit(torch.utils.data.Subset(ds, idx.tolist()), labels[idx], _spaced(ds.classes), [root / "SUN397"])


def _voc2007_reader(root: Path, split: str, transform: Transform) -> EvalSplit:
    """VOC2007 image-level multi-label targets from ``ImageSets/Main/<class>_<split>.txt`` (1 / -1 / 0 = difficult).

    Targets are 1 (present), 0 (absent), -1 (only difficult instances; ignored by the mAP, as in the devkit).
    """
    base = root / "VOCdevkit" / "VOC2007"
    main = base / "ImageSets" / "Main"
    image_ids: list[str] | None = None
    columns = []
    for category in names.VOC2007_CATEGORIES:
        path = main / f"{category}_{split}.txt"
        if not path.is_file():
            raise DatasetNotFound(f"voc2007: missing {path} (the {split} annotations of the VOC2007 distribution)")
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        ids = [r[0] for r in rows]
        if image_ids is None:
            image_ids = ids
        elif ids != image_ids:
            raise DatasetError(f"{path}: image list differs from {names.VOC2007_CATEGORIES[0]}_{split}.txt")
        columns.append([{"1": 1, "-1": 0, "0": -1}[r[1]] for r in rows])
    targets = np.asarray(columns, dtype=np.int64).T  # N, 20
    paths = [base / "JPEGImages" / f"{i}.jpg" for i in image_ids]
    return EvalSplit(ImageList(paths, targets, transform), targets, list(names.VOC2007_CLASSNAMES), [base])


def imagenet_classnames(path: str | Path | None = None) -> list[str]:
    """ImageNet-1K class names in wnid order: CLIP's 1000 curated names from open_clip, or a user file (one a line)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DatasetNotFound(f"{path}: class-name file not found")
        found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        try:
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        except ImportError:
            raise DatasetError(
                "ImageNet class names: install open_clip (pip install open-clip-torch) for CLIP's curated names, "
                "or pass --classnames FILE with 1000 names, one a line, in wnid order"
            ) from None
        found = list(IMAGENET_CLASSNAMES)
    if len(found) != 1000:
        raise DatasetError(f"ImageNet-1K needs 1000 class names, got {len(found)}")
    return found


def _imagenet_reader(classnames_file: str | Path | None):
    def read(root: Path, split: str, transform: Transform) -> EvalSplit:
        folder = root / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise DatasetNotFound(f"imagenet: missing {folder} (class folders named by wnid)")
        ds = image_folder(folder, transform, "imagenet")
        if len(ds.classes) != 1000:
            raise DatasetError(f"{folder}: expected 1000 wnid folders, found {len(ds.classes)}")
        return EvalSplit(ds, np.asarray(ds.targets, dtype=np.int64), imagenet_classnames(classnames_file), [folder])

    return read


def _imagefolder_reader(root: Path, split: str, transform: Transform) -> EvalSplit:
    folder = root / split
    if not folder.is_dir():
        raise DatasetNotFound(f"imagefolder: missing {folder} (expected <data-root>/{split}/<class>/<image files>)")
    ds = image_folder(folder, transform, "imagefolder")
    return EvalSplit(ds, np.asarray(ds.targets, dtype=np.int64), _spaced(ds.classes), [folder])


def _fashion_mnist_reader(root: Path, split: str, transform: Transform) -> EvalSplit:
    from florence.data.sources import FashionMNISTSource

    source = FashionMNISTSource(root, split="train" if split == "train" else "test")
    return EvalSplit(_TensorImages(source.images, source.labels, transform), source.labels,
                     list(source.class_names), list(source.files))


class _TensorImages(Dataset):
    """uint8 images ``(N, H, W)`` held in memory; the transform takes a uint8 tensor (florence.data.transforms)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform):
        self.images, self.labels, self.transform = torch.from_numpy(images), labels, transform  # shares memory

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])




def build_specs(imagenet_classnames_file: str | Path | None = None) -> dict[str, DatasetSpec]:
    """All dataset specifications by ``--dataset`` name."""
    caltech_fix = _fixed_names(names.CALTECH101_CLASSNAMES)
    flowers_fix = _fixed_names(names.FLOWERS102_CLASSNAMES)
    specs = [
        DatasetSpec("imagenet", "ImageNet", "top1", "imagenet", "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
                    ("val",), None, _imagenet_reader(imagenet_classnames_file)),
        DatasetSpec("food101", "Food101", "top1", "food101", "food-101/{images,meta} (torchvision Food101)",
                    ("food-101/meta/test.json",), None,
                    _torchvision_reader("Food101", "food-101", {"train": "train", "test": "test"})),
        DatasetSpec("cifar10", "CIFAR10", "top1", "cifar10", "cifar-10-batches-py/ (the python version)",
                    ("cifar-10-batches-py/batches.meta",), None,
                    _torchvision_reader("CIFAR10", "cifar-10-batches-py", {})),
        DatasetSpec("cifar100", "CIFAR100", "top1", "cifar100", "cifar-100-python/ (the python version)",
                    ("cifar-100-python/meta",), None, _torchvision_reader("CIFAR100", "cifar-100-python", {})),
        DatasetSpec("sun397", "SUN397", "top1", "sun397", "SUN397/ClassName.txt and SUN397/<letter>/<class>/*.jpg",
                    ("SUN397/ClassName.txt",), None, _sun397_reader),
        DatasetSpec("cars", "Cars", "top1", "cars",
                    "stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}",
                    ("stanford_cars/devkit/cars_meta.mat",), None,
                    _torchvision_reader("StanfordCars", "stanford_cars", {"train": "train", "test": "test"},
                                        fix_names=list)),
        DatasetSpec("fgvc_aircraft", "Aircraft", "mean_per_class", "fgvc_aircraft",
                    "fgvc-aircraft-2013b/data/{images,variants.txt,images_variant_*.txt}",
                    ("fgvc-aircraft-2013b/data/variants.txt",), "fgvc-aircraft-2013b/data",
                    _torchvision_reader("FGVCAircraft", "fgvc-aircraft-2013b",
                                        {"train": "train", "val": "val", "test": "test"}, fix_names=list,
                                        annotation_level="variant")),
        DatasetSpec("voc2007", "VOC2007", "map_11point", "voc2007",
                    "VOCdevkit/VOC2007/{JPEGImages,ImageSets/Main/<class>_{train,val,test}.txt}",
                    ("VOCdevkit/VOC2007/ImageSets/Main",), "VOCdevkit/VOC2007/ImageSets/Main", _voc2007_reader),
        DatasetSpec("dtd", "DTD", "top1", "dtd", "dtd/dtd/{images,labels} (partition 1)", ("dtd/dtd/labels",),
                    "dtd/dtd/labels",
                    _torchvision_reader("DTD", "dtd", {"train": "train", "val": "val", "test": "test"})),
        DatasetSpec("pets", "Pets", "mean_per_class", "pets", "oxford-iiit-pet/{images,annotations}",
                    ("oxford-iiit-pet/annotations/test.txt",), None,
                    _torchvision_reader("OxfordIIITPet", "oxford-iiit-pet", {"train": "trainval", "test": "test"},
                                        fix_names=list)),
        DatasetSpec("caltech101", "Caltech101", "mean_per_class", "caltech101",
                    "caltech101/101_ObjectCategories/<class>/*.jpg (102 folders including BACKGROUND_Google)",
                    ("caltech101/101_ObjectCategories",), None,
                    _folder_reader("caltech101/101_ObjectCategories", 30, None, caltech_fix)),
        DatasetSpec("flowers102", "Flowers102", "mean_per_class", "flowers102",
                    "flowers-102/{jpg,imagelabels.mat,setid.mat}",
                    ("flowers-102/setid.mat",), "flowers-102/setid.mat",
                    _torchvision_reader("Flowers102", "flowers-102", {"train": "train", "val": "val", "test": "test"},
                                        fix_names=flowers_fix)),
        DatasetSpec("fashion_mnist", None, "top1", "imagenet",
                    "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (apt-get install dataset-fashion-mnist)",
                    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), None, _fashion_mnist_reader),
        DatasetSpec("imagefolder", None, "top1", "imagenet", "<split>/<class>/<image files> for split in train, test",
                    ("test",), "val", _imagefolder_reader),
    ]
    return {s.name: s for s in specs}


def get_spec(name: str, imagenet_classnames_file: str | Path | None = None) -> DatasetSpec:
    specs = build_specs(imagenet_classnames_file)
    if name not in specs:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(specs)}")
    return specs[name]


def carve_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of train indices into (train, val); ``fraction`` of each class (at least 1) to val.

    Multi-label ``(N, C)`` targets are split uniformly at random instead.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        idx = rng.permutation(len(labels))
        n_val = max(1, int(round(fraction * len(labels))))
        return np.sort(idx[n_val:]), np.sort(idx[:n_val])
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of about ``limit`` samples with the class proportions of ``labels``."""
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        return np.sort(rng.permutation(len(labels))[:limit])
    picked = []
    classes, counts = np.unique(labels, return_counts=True)
    for c, n in zip(classes, counts):
        take = max(1, int(round(limit * n / len(labels))))
        picked.append(rng.permutation(np.flatnonzero(labels == c))[:take])
    return np.sort(np.concatenate(picked))


def data_manifest(files: list[Path], content_limit_bytes: int = 256 << 20) -> dict:
    """File count and one hash over the files of a split (folders walked recursively, sorted).

    The hash covers each file's relative path and SHA-256 of its content while the total stays under
    ``content_limit_bytes``; above it (ImageNet-size folders) only relative path and size are hashed, and ``method``
    says which.
    """
    entries: list[tuple[str, Path]] = []
    for item in files:
        item = Path(item)
        if item.is_dir():
            for dirpath, _, filenames in os.walk(item):
                for name in filenames:
                    path = Path(dirpath) / name
                    entries.append((path.relative_to(item.parent).as_posix(), path))
        elif item.is_file():
            entries.append((item.name, item))
        else:
            raise DatasetNotFound(f"{item}: missing")
    entries.sort()
    total = sum(p.stat().st_size for _, p in entries)
    by_content = total <= content_limit_bytes
    digest = hashlib.sha256()
    for rel, path in entries:
        if by_content:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digest.update(f"{rel}\t{h.hexdigest()}\n".encode())
        else:
            digest.update(f"{rel}\t{path.stat().st_size}\n".encode())
    return {
        "roots": [str(Path(f)) for f in files],
        "file_count": len(entries),
        "total_bytes": total,
        "sha256": digest.hexdigest(),
        "method": "path+content-sha256" if by_content else "path+size",
    }
