"""LoRA / QLoRA training: ``run`` (load, prepare, train, save: the one path every caller takes),
``loop`` (the loop in named stages), ``lora`` (PEFT wrapping, attention kernel), ``lora_dropout``,
``loss``, ``batching``, ``checkpoints``, ``distributed`` (accelerate), ``records`` (what a run reports).

Torch-free: records
"""
