"""lm-evaluation-harness task definitions that read the original task files from a local data dir.

Each YAML here mirrors the lm-eval built-in task of the same name (same prompt, target, choices,
metrics and version) with ``dataset_path: json`` and ``data_files`` relative to
``<data dir>/tasks/``; ``utils.py`` turns the original layouts into the hub layouts those built-in
prompts expect (ARC, BoolQ, HellaSwag). ``tests/test_suite_accuracy.py`` checks both give the same
requests on the same rows. ``qbench.suites.accuracy`` loads them.
"""
