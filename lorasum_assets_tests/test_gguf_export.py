"""GGUF export: what it refuses before anything loads, the Ollama Modelfile, and (slow, with
`make setup-gguf`) the export of the default profile's adapter checked by llama.cpp itself."""

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.ml.data.prompts import render_prompt
from lorasum_assets.ml.export.gguf import (
    GgufExportError,
    check_adapter_convertible,
    converters_dir,
    ollama_modelfile,
    prompt_template,
)

REPO = Path(__file__).resolve().parents[1]


def adapter_folder(tmp_path: Path, **config) -> str:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "v_proj"], **config}))
    return str(folder)


@pytest.mark.parametrize("config,named", [
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"target_modules": ["lm_head", "v_proj"]}, "lm_head"),
    ({"modules_to_save": ["lm_head", "embed_tokens"]}, "embed_tokens, lm_head"),
])
def test_an_adapter_the_lora_converter_cannot_take_is_refused_naming_the_module(tmp_path, config, named):
    with pytest.raises(GgufExportError, match=f"adapts or saves {named}: llama.cpp's LoRA converter takes LoRA on linear"):
        check_adapter_convertible(adapter_folder(tmp_path, **config))
    check_adapter_convertible(adapter_folder(tmp_path, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def test_missing_converters_name_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASUM_LLAMA_CPP", str(tmp_path))
    with pytest.raises(GgufExportError, match=f"llama.cpp's converters are not in {tmp_path}: run `make setup-gguf`"):
        converters_dir()


def test_the_modelfile_prompts_as_lorasum_generates_and_stops_where_it_stops(tiny_tokenizer):
    template = prompt_template(tiny_tokenizer, False, "natural")
    assert template == "Summarize the following conversation.\n\n{{ .Prompt }}\n\nSummary:"
    dialogue = "#Person1#: Hi.\n#Person2#: Hello."
    assert template.replace("{{ .Prompt }}", dialogue) == render_prompt(dialogue, tiny_tokenizer, False, "natural")
    text = ollama_modelfile("./model.gguf", template, ["</s>", "<|im_end|>"])
    assert text == ('FROM ./model.gguf\nTEMPLATE """Summarize the following conversation.\n\n{{ .Prompt }}\n\nSummary:"""\n'
                    'PARAMETER temperature 0\nPARAMETER top_k 1\nPARAMETER stop "</s>"\nPARAMETER stop "<|im_end|>"\n')
    on_base = ollama_modelfile("/base/SmolLM2.gguf", template, ["<|im_end|>"], adapter="./adapter.gguf")
    assert on_base.splitlines()[:2] == ["FROM /base/SmolLM2.gguf", "ADAPTER ./adapter.gguf"]


def trained_adapter_id(profile: str, **training: object) -> str:
    from lorasum_assets.defs.assets import ALL_ASSETS
    from lorasum_assets.defs.resources.factory import build_resources
    from lorasum_assets.settings.profiles import get_profile

    done = dg.materialize(ALL_ASSETS, resources=build_resources(get_profile(profile)), instance=dg.DagsterInstance.ephemeral(),
                          selection="*lora_adapter", run_config=with_training(SHORT_TRAINING.get(profile, {}), training))
    return done.asset_materializations_for_node("lora_adapter")[0].metadata["lorasum/reference"].value["adapter_id"]


def with_training(run_config: dict, training: dict) -> dict:
    config = {**run_config.get("ops", {}).get("lora_adapter", {}).get("config", {}), **training}
    return {**run_config, "ops": {**run_config.get("ops", {}), "lora_adapter": {"config": config}}}


SHORT_TRAINING = {
    # the default profile's recipe on the sample, 16 optimizer steps: a real adapter in about a minute
    "smollm2-135m": {"ops": {"lora_adapter": {"config": {"max_steps": 16}}}},
}


def test_a_gguf_export_refuses_an_existing_folder_and_missing_converters_and_leaves_nothing(fresh_home, tmp_path, monkeypatch, capsys):
    from lorasum_assets.tools.cli import main

    adapter_id = trained_adapter_id("tiny")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export-model", adapter_id, str(occupied), "--gguf", "--force"]) == 1
    assert "exists and is not an empty folder; a GGUF export goes into a new folder" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    monkeypatch.setenv("LORASUM_LLAMA_CPP", str(tmp_path / "no-converters"))
    out = tmp_path / "gguf"
    assert main(["export-model", adapter_id, str(out), "--gguf"]) == 1
    assert "run `make setup-gguf`" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".gguf-")]


def llama_cpp_installed() -> bool:
    try:
        converters_dir()
        import llama_cpp  # noqa: F401
    except (GgufExportError, ImportError):
        return False
    return True


needs_llama_cpp = pytest.mark.skipif(not llama_cpp_installed(), reason="llama.cpp is not installed: make setup-gguf")
SAME = re.compile(r"greedy outputs identical on (\d) of 8 prompts")


@pytest.mark.slow
@needs_llama_cpp
def test_the_default_profiles_adapter_as_gguf_computes_what_it_computes_in_transformers(fresh_home, tmp_path, capsys):
    from lorasum_assets.tools.cli import main

    adapter_id = trained_adapter_id("smollm2-135m")
    reports = []
    for out_type in ("bf16", "q8_0"):
        out = tmp_path / f"gguf-{out_type}"
        capsys.readouterr()
        assert main(["export-model", adapter_id, str(out), "--gguf", "--type", out_type]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        reports.append(printed)
        assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "Modelfile.adapter", "README.md", "adapter.gguf", "model.gguf"]
        model_line, adapter_line = printed.splitlines()[2], printed.splitlines()[3]
        assert model_line.startswith("model.gguf checked in llama.cpp") and adapter_line.startswith("adapter.gguf on the base GGUF checked")
        for line in (model_line, adapter_line):
            # the check itself holds every parting to a near-tie of base + adapter's top two logits
            assert int(SAME.search(line).group(1)) >= 3, line
        modelfile = (out / "Modelfile").read_text()
        assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Prompt }}" in modelfile
    with capsys.disabled():
        print("\n" + "\n".join(reports))


@pytest.mark.slow
@needs_llama_cpp
def test_an_adapter_converted_without_its_qk_permutation_is_refused(fresh_home, tmp_path, monkeypatch, capsys):
    """llama.cpp's rope layout needs q_proj and k_proj rows permuted; for LoRA that is lora_B's rows.
    A converter that skips it gives an adapter.gguf that computes something else: the export refuses.
    On a q/k/v/o adapter: on the default's all-linear one the MLP's share of the effect hides the
    fault within the tolerance (docs/export.md)."""
    from lorasum_assets.tools.cli import main

    broken = tmp_path / "broken-converters"
    shutil.copytree(converters_dir(), broken)
    script = broken / "convert_lora_to_gguf.py"
    source = script.read_text()
    assert source.count("    def permute(self, *dims: int) -> LoraTorchTensor:\n") == 1
    script.write_text(source.replace("    def permute(self, *dims: int) -> LoraTorchTensor:\n",
                                     "    def permute(self, *dims: int) -> LoraTorchTensor:\n        return self\n"))
    monkeypatch.setenv("LORASUM_LLAMA_CPP", str(broken))
    adapter_id = trained_adapter_id("smollm2-135m", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = tmp_path / "gguf"
    capsys.readouterr()
    assert main(["export-model", adapter_id, str(out), "--gguf"]) == 1
    said = capsys.readouterr().err
    print(said)
    assert "adapter.gguf on SmolLM2-135M-Instruct.Q4_1.gguf in llama.cpp does not compute what base + adapter computes" in said
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".gguf-")]


@pytest.mark.slow
@needs_llama_cpp
def test_the_recipes_stand_in_is_refused_naming_its_unrecognised_pre_tokenizer(stand_in_dir, tmp_path):
    """The 4-bit Llama 3.2 stand-in's tokenizer is a BPE trained on our sample: llama.cpp's converter
    identifies BPE tokenizers by the hash of their output on a fixed text and knows only published ones.
    The export is refused with that cause, after its 16-bit merge, and nothing is left."""
    from lorasum_assets.ml.export.gguf import export_gguf
    from lorasum_assets.ml.models.adapter_files import save_adapter
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.training.lora import prepare_peft_model
    from lorasum_assets.settings.specs import TrainSpec
    from lorasum_assets.tools.cli.adapters import check_prompts

    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4")
    peft_model = prepare_peft_model(load_model(spec), TrainSpec(gradient_checkpointing=False))
    adapter = save_adapter(peft_model, load_tokenizer(spec), tmp_path / "adapter")
    out = tmp_path / "gguf"
    with pytest.raises(GgufExportError, match="its tokenizer's pre-tokenizer is not one llama.cpp recognises"):
        export_gguf(spec, str(adapter), out, check_prompts(spec, {}), out_type="bf16", prompt_format=(False, "natural"),
                    merge_tolerance=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
