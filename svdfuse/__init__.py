"""svdfuse: multi-source knowledge transfer by model merging (AXIS), fast.

    result = svdfuse.merge(sources, k=76, base=base_model)
    model = result.to_module(base_model)
    svdfuse.adapt(model, loader, n=0.1)
"""

from svdfuse import bundle, methods, nn, ops, serving
from svdfuse.stage2 import AdaptReport, adapt
from svdfuse.atlas_baseline import atlas
from svdfuse.caches import decompose
from svdfuse.compress import CompressReport, compress
from svdfuse.config import merge_config
from svdfuse.export import LoraReport, export_lora
from svdfuse.merging import merge
from svdfuse.ops import SVDOptions
from svdfuse.report import LayerReport, MergeReport
from svdfuse.result import MergeResult, SaveFormat
from svdfuse.sinks import save_hf_directory, save_safetensors
from svdfuse.sources import SourceError
from svdfuse.version import __version__

__all__ = [
    "merge",
    "merge_config",
    "decompose",
    "compress",
    "bundle",
    "CompressReport",
    "export_lora",
    "adapt",
    "atlas",
    "methods",
    "ops",
    "nn",
    "serving",
    "SVDOptions",
    "MergeResult",
    "SaveFormat",
    "MergeReport",
    "LayerReport",
    "AdaptReport",
    "LoraReport",
    "SourceError",
    "save_safetensors",
    "save_hf_directory",
]
