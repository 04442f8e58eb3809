"""Shared test setup."""

import os

# Real-model tests load only local files; make any accidental hub access fail instead of
# downloading. Set at import, before any test module imports huggingface_hub, which reads
# these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
