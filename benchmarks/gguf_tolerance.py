"""The measurement behind the GGUF export's tolerances: how far llama.cpp's logits lie from base +
adapter in transformers for each GGUF type, and for the adapter on the packaged base GGUF, with an
adapter trained on the bundled sample; and how far a conversion that skips lora_B's Q/K permutation
lies (the fault the check is there to catch).

    python -m benchmarks.gguf_tolerance [--steps 16] [--out benchmarks/results/gguf_tolerance.json]

Needs `make setup-gguf`. Prints one line per variant and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, print_host
from lorasum_assets.runtime.quiet import quiet_known_noise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of the adapter's training")
    parser.add_argument("--out", default=str(RESULTS / "gguf_tolerance.json"))
    args = parser.parse_args()

    from lorasum_assets.ml.data.prompts import encode_example, encode_prompts
    from lorasum_assets.ml.data.readers import read_sample
    from lorasum_assets.ml.export import gguf
    from lorasum_assets.ml.export.merged import merge_adapter
    from lorasum_assets.ml.models.loading import load_model, load_tokenizer, packaged_gguf_path
    from lorasum_assets.ml.training.batching import TrainExample
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import train_adapter
    from lorasum_assets.runtime.models import base_model_spec
    from lorasum_assets.settings.profiles import PROFILES

    print_host()
    profile = PROFILES["smollm2-135m"]
    spec = base_model_spec(profile.model, device="cpu")
    tokenizer = load_tokenizer(spec)
    sample = read_sample()
    train = [row.values for row in sample["train"]]
    examples = []
    for row in train:
        e = encode_example(tokenizer, row["dialogue"], row["summary"], 512)
        examples.append(TrainExample(e.input_ids, e.labels))
    work = Path(tempfile.mkdtemp(prefix="gguf-tolerance-"))
    training = dataclasses.replace(profile.training, max_steps=args.steps, epochs=1)
    trained = train_adapter(TrainingRequest(spec=training, train_examples=examples, val_examples=[], adapter_dir=work / "adapter"),
                            load=lambda: (tokenizer, load_model(spec)))
    print(f"adapter: {trained.total_steps} steps on {len(examples)} sample dialogues, loss {trained.steps[0].loss:.3f} -> {trained.steps[-1].loss:.3f}")

    dialogues = [row.values["dialogue"] for row in sample["test"][:8]]
    prompts = [ids for ids, _ in encode_prompts(tokenizer, dialogues, use_chat_template=False, boundary="natural", max_prompt_tokens=1024)]
    folder = gguf.converters_dir()
    ref = gguf.reference(spec, str(work / "adapter"), prompts)
    merged = merge_adapter(spec, str(work / "adapter"), work / "merged", prompts, reference_paths=ref.paths)
    figures = {"merged": {"gap": merged.check.max_gap, "same": merged.check.same_greedy, "partings": merged.check.partings}}
    print(f"merged (transformers): {merged.check.describe()}")

    base_gguf = packaged_gguf_path(profile.model.model)

    def measure(name: str, model_file: Path) -> None:
        check, _ = gguf.check_gguf_model(model_file, ref, tolerance=1.0)
        figures[name] = {"gap": check.max_gap, "same": check.same_greedy, "partings": check.partings}
        print(f"{name}: {check.describe().replace(' (tolerance 1.0)', '')}")

    def measure_adapter(name: str, lora: Path) -> None:
        check = gguf.check_gguf_adapter(base_gguf, lora, ref, tolerance=1.0)
        figures[name] = {"effect_error": check.effect_error, "same": check.paths.same_greedy, "partings": check.paths.partings}
        print(f"{name}: {check.describe().replace(' (tolerance 100%)', '')}")

    for out_type in gguf.GGUF_TYPES:
        gguf.run_converter(folder, "convert_hf_to_gguf.py", [str(work / "merged"), "--outtype", out_type,
                                                             "--outfile", str(work / f"model-{out_type}.gguf")], "the merged model")
        gguf.run_converter(folder, "convert_lora_to_gguf.py", [str(work / "adapter"), "--base", str(work / "merged"), "--outtype",
                                                               out_type, "--outfile", str(work / f"adapter-{out_type}.gguf")], "the adapter")
        measure(f"model.gguf {out_type}", work / f"model-{out_type}.gguf")
        measure_adapter(f"Q4_1 base + adapter.gguf {out_type}", work / f"adapter-{out_type}.gguf")

    broken = work / "broken-converters"
    shutil.copytree(folder, broken)
    script = broken / "convert_lora_to_gguf.py"
    script.write_text(script.read_text().replace("    def permute(self, *dims: int) -> LoraTorchTensor:\n",
                                                 "    def permute(self, *dims: int) -> LoraTorchTensor:\n        return self\n"))
    gguf.run_converter(broken, "convert_lora_to_gguf.py", [str(work / "adapter"), "--base", str(work / "merged"), "--outtype", "bf16",
                                                           "--outfile", str(work / "adapter-unpermuted.gguf")], "the adapter")
    measure_adapter("Q4_1 base + adapter.gguf bf16 without the Q/K permutation", work / "adapter-unpermuted.gguf")
    # an adapter that changes nothing: what a lost adapter (or a lost LoRA scale) computes
    gguf.run_converter(folder, "convert_lora_to_gguf.py", [str(work / "adapter"), "--base", str(work / "merged"), "--outtype", "bf16",
                                                           "--outfile", str(work / "adapter-bf16.gguf")], "the adapter")
    zeroed = work / "adapter-zero"
    shutil.copytree(work / "adapter", zeroed)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(zeroed / "adapter_model.safetensors"))
    save_file({k: v * 0 if "lora_B" in k else v for k, v in weights.items()}, str(zeroed / "adapter_model.safetensors"))
    gguf.run_converter(folder, "convert_lora_to_gguf.py", [str(zeroed), "--base", str(work / "merged"), "--outtype", "bf16",
                                                           "--outfile", str(work / "adapter-zero.gguf")], "the adapter")
    measure_adapter("Q4_1 base + an adapter.gguf whose lora_B is zero (a lost adapter)", work / "adapter-zero.gguf")
    Path(args.out).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(main())
