"""Pure ML code, grouped by role; no dagster imports, so every piece is testable on its own.

- ``data/``: reading DialogSum, normalised dialogues and the 1/100 filter, prompts and labels.
- ``models/``: loading the base and tokenizer, the tiny stand-ins, devices, precision, 4-bit layers, adapter files.
- ``training/``: the LoRA training loop and its stages, and the records it reports.
- ``generation/``: batched greedy generation and the lorasum decoder.
- ``evaluation/``: BERTScore, ROUGE, bootstrap statistics, scoring and the promotion rule.
- ``export/``: shipping an adapter as a merged model.
- ``progress.py``: progress lines for long work, used by training and generation alike.

Subpackages import only those listed before them (``data`` ← ``models`` ← ``training``,
``generation`` ← ``export``; ``evaluation`` stands alone). Each one's docstring names its modules
that load without torch (``Torch-free:``); the code location may import those when it loads, and
``lorasum_assets_tests/test_structure.py`` checks both rules.
"""
