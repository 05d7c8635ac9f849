"""bitsandbytes' 4-bit layers: finding them, whether a model holds any, and keeping their storage
layout one that trains (bitsandbytes repacks them for CPU inference)."""

from __future__ import annotations

import contextlib
import warnings


def four_bit_layers(model) -> list:
    """bitsandbytes' 4-bit layers (``Linear4bit``) themselves, each once; not a LoRA wrapper,
    which shows its base layer's weight as its own but computes nothing of its own."""
    return [m for m in model.modules() if getattr(m, "weight", None).__class__.__name__ == "Params4bit" and hasattr(m, "compute_dtype")]



def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class FourBitLayoutWarning(UserWarning):
    """bitsandbytes left a 4-bit layer of a model that trains in its CPU inference layout."""


def _holds_cpu_inference_layout(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def restore_4bit_layout(model) -> int:
    """Put every 4-bit layer of ``model`` back in bitsandbytes' ordinary layout; returns how many
    had left it.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight for its inference kernel
    the first time the layer runs in eval mode on an input that needs no grad (validation,
    generation). From then on every matmul of that layer, training included, goes through that
    kernel, which has no backward: no gradient reaches the LoRA weights below it, and dequantizing
    the packed weight (a merge) gives garbage. The repacked state is recognised by the flag
    ``matmul_4bit`` itself dispatches on and undone with the inverse bitsandbytes' own
    ``_save_to_state_dict`` and ``.cuda()`` use. That inverse is lossy for double quantization (the
    absmax goes through bf16 and is quantized again), so training keeps layers from repacking in
    the first place (``evaluating``); this is the safety net.
    """
    packed = [layer for layer in four_bit_layers(model) if _holds_cpu_inference_layout(layer)]
    if not packed:
        return 0
    # only a model that bitsandbytes repacked gets here: unquantized training never imports it
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for layer in packed:
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    return len(packed)


@contextlib.contextmanager
def evaluating(model):
    """``model`` in eval mode for the block (no dropout), back in its own mode after it.

    A model that is training keeps its 4-bit layers in training mode meanwhile: they compute the
    same in either mode, and bitsandbytes repacks only layers in eval mode (see
    ``restore_4bit_layout``). Should a bitsandbytes upgrade repack them anyway, they are restored
    after the block and a ``FourBitLayoutWarning`` says so (the test suite makes it an error).
    """
    was_training = model.training
    model.eval()
    if was_training:
        for layer in four_bit_layers(model):
            layer.train()
    try:
        yield model
    finally:
        model.train(was_training)
        if was_training and (restored := restore_4bit_layout(model)):
            warnings.warn(f"bitsandbytes repacked {restored} 4-bit layers of a training model for inference although they were "
                          "in training mode; restored (lossy for double quantization)", FourBitLayoutWarning, stacklevel=3)
