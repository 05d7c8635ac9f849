"""The base model: ``loading`` (hub ids, local folders, packaged GGUF, quantization as loaded),
``tiny`` (the random tiny Llamas of tests and smoke runs), ``devices`` and ``precision`` (what the
hardware runs, the dtypes chosen), ``four_bit`` (bitsandbytes' 4-bit layers and their layout),
``adapter_files`` (the adapter folder: written atomically, hashed, verified).

Torch-free: four_bit, adapter_files
"""
