"""Shared test fixtures: offline hub, deterministic seeds, the optional TACO sample."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# The CI machine has 2 cores; tests are small, and oversubscribed threads only slow them down.
torch.set_num_threads(int(os.environ.get("RTDETRV4_TEST_THREADS", 1)))

REPO = Path(__file__).resolve().parents[1]
TACO = Path(os.environ.get("TACO_DIR", REPO.parent / "shared" / "data" / "taco_val"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def taco_dir() -> Path:
    """The 225 real TACO validation images (YOLO format); skips when the folder is absent."""
    if not (TACO / "data.yaml").is_file():
        pytest.skip(f"TACO sample not found at {TACO} (set TACO_DIR to run this test)")
    return TACO


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
