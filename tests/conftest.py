import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
