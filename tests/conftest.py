"""Shared test setup."""

import os

import pytest
import torch

# Real-model tests load only local files; make any accidental hub access fail instead of
# downloading. Set at import, before any test module imports huggingface_hub, which reads
# these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def cuda():
    # Checked here, not at collection: tests never touch CUDA while being collected.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
