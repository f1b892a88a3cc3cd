import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import florence
from florence.tokenizer import train_bpe_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster with one thread on a shared 2-core machine
    yield
    torch.set_num_threads(before)


one_thread = pytest.fixture(_one_thread)  # for one test
one_thread_module = pytest.fixture(scope="module")(_one_thread)  # for a whole test file (pytestmark usefixtures)


@pytest.fixture(scope="session")
def tiny_dual_encoder(tmp_path_factory):
    """A factory: ``tiny_dual_encoder(texts, seed=0)`` -> the bundle directory of a fresh ``unicl_test`` dual encoder
    (weights drawn with ``seed``) whose byte-level BPE tokenizer was trained on ``texts``."""

    def make(texts, seed: int = 0) -> Path:
        root = tmp_path_factory.mktemp("dual_encoder")
        train_bpe_tokenizer(list(texts), root / "tok", vocab_size=300, min_frequency=1)
        torch.manual_seed(seed)
        return florence.create_model("unicl_test", tokenizer=str(root / "tok")).save_pretrained(root / "bundle")

    return make


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """An ImageFolder of 4 classes x 8 generated 28x28 RGB images, a class-specific pattern plus noise."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    patterns = {
        "circle": ((yy - 14) ** 2 + (xx - 14) ** 2 < 80),
        "square": (abs(yy - 14) < 8) & (abs(xx - 14) < 8),
        "stripes": (xx // 3) % 2 == 0,
        "dots": ((yy % 7) < 2) & ((xx % 7) < 2),
    }
    for name, mask in patterns.items():
        (root / name).mkdir()
        for i in range(8):
            img = rng.integers(0, 60, (28, 28, 3)) + 180 * mask[..., None] * rng.uniform(0.7, 1.0, 3)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    """Fashion-MNIST-shaped idx files: 40 train / 20 test items, each a bright rectangle on black, labels 0..9."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for img in images:
            y0, x0 = rng.integers(0, 10, 2)
            y1, x1 = rng.integers(18, 28, 2)
            img[y0:y1, x0:x1] = rng.integers(150, 256)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root
