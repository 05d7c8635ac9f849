"""lorasum: LoRA/QLoRA fine-tuning for dialogue summarization as Dagster assets."""

__version__ = "0.1.0"
