"""`svdfuse study`: does AXIS transfer better than the other merges, measured so that it could tell.

Leave-one-out over real labelled tasks per modality (text: all-MiniLM-L6-v2; vision:
EfficientNet-Lite0): sources fine-tuned on all of their task's data, targets few-shot; every method
tuned alike on validation, its head trained alike; paired differences with bootstrap intervals.
Results: `results.json`, `results.md` and a PNG plot.

Example::

    from svdfuse.study import StudyConfig, run_study
    run_study(StudyConfig(), Path("study/"))
"""

from svdfuse.study.runner import StudyConfig, quick_config, run_study

__all__ = ["StudyConfig", "quick_config", "run_study"]
