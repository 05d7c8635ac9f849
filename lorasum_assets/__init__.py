"""lorasum: LoRA/QLoRA fine-tuning for dialogue summarization as Dagster assets.

Importing the package changes nothing global: the entry points (the code location in
``definitions.py``, the ``lorasum`` CLI, the accelerate worker) hide the libraries' known noise
where they start (``runtime/quiet.py``)."""

__version__ = "0.1.0"
