"""`svdfuse study`: the AXIS paper's transfer protocol on real pretrained models, offline.

Leave-one-out over real labelled tasks per modality (text: all-MiniLM-L6-v2; vision:
EfficientNet-Lite0), every source a fixed-seed fine-tune cached on disk; AXIS and the other merges
+ Stage 2 at matched trainable parameters, aTLAS and references; N sweep, seeds, robustness.
Results: `results.json`, `results.md` (the paper's table layout) and PNG plots.

Example::

    from svdfuse.study import StudyConfig, run_study
    run_study(StudyConfig(), Path("study/"))
"""

from svdfuse.study.runner import CONDITIONS, StudyConfig, combine, quick_config, run_study

__all__ = ["StudyConfig", "quick_config", "run_study", "combine", "CONDITIONS"]
