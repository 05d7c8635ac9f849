"""lorasum: LoRA/QLoRA fine-tuning for dialogue summarization as Dagster assets."""

__version__ = "0.1.0"

from lorasum_assets.runtime.quiet import quiet_known_noise  # noqa: E402 - before any library is imported

quiet_known_noise()
