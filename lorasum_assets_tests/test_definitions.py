import dagster as dg

from lorasum_assets.definitions import defs

EXPECTED_DEPS = {
    "raw_dialogsum": set(),
    "filtered_split": {"raw_dialogsum"},
    "tokenized_dataset": {"filtered_split"},
    "lora_adapter": {"tokenized_dataset"},
    "base_predictions": {"filtered_split"},
    "tuned_predictions": {"lora_adapter", "filtered_split"},
    "bertscore_report": {"base_predictions", "tuned_predictions", "filtered_split"},
    "promoted_adapter": {"bertscore_report", "filtered_split"},
}
EXPECTED_GROUPS = {
    "raw_dialogsum": "data",
    "filtered_split": "data",
    "tokenized_dataset": "data",
    "lora_adapter": "training",
    "base_predictions": "evaluation",
    "tuned_predictions": "evaluation",
    "bertscore_report": "evaluation",
    "promoted_adapter": "evaluation",
}


def test_definitions_load_with_exactly_the_eight_assets_and_edges():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_DEPS)
    for key, deps in EXPECTED_DEPS.items():
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey(key)).parent_keys}
        assert parents == deps, key


TORCH_ASSETS = {"lora_adapter", "base_predictions", "tuned_predictions"}


def test_groups_kinds_and_code_versions():
    graph = defs.resolve_asset_graph()
    for key, group in EXPECTED_GROUPS.items():
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group
        assert set(node.kinds) == ({"pytorch", "duckdb"} if key in TORCH_ASSETS else {"python", "duckdb"}), key
        assert len(node.code_version) == 16, (key, node.code_version)


def test_gpu_steps_share_a_pool_and_the_job_runs_in_process():
    for key in ("lora_adapter", "base_predictions", "tuned_predictions", "promoted_adapter"):
        assert defs.resolve_assets_def(key).node_def.pool == "lorasum_gpu"
    job = defs.resolve_job_def("train_and_evaluate")
    assert job.executor_def.name == "in_process"


def test_resources_follow_the_profile_and_each_run_can_pick_another():
    import dataclasses

    from lorasum_assets.defs.resources import BertScorerResource, LoraModelResource, ProfileResource
    from lorasum_assets.settings.profiles import get_profile

    name = "llama-3.2-3b-qlora"
    profile = get_profile(name)
    assert LoraModelResource(profile=ProfileResource(name=name)).choice() == profile.model
    assert BertScorerResource(profile=ProfileResource(name=name)).spec() == profile.scorer
    # a run's resource config overrides single fields of its profile, and only those
    overridden = LoraModelResource(profile=ProfileResource(name=name), quantization="none").choice()
    assert profile.model.quantization != "none"
    assert overridden == dataclasses.replace(profile.model, quantization="none")


def test_every_setting_is_defined_once_and_settable_per_run():
    """The Launchpad's config schema holds every field of every spec, derived, not listed by hand."""
    from dataclasses import fields

    from lorasum_assets.settings.specs import (
        BertScoreSpec,
        DataSpec,
        FilterSpec,
        GenerationSpec,
        ModelChoice,
        PromotionSpec,
        ReportSpec,
        TokenizeSpec,
        TrainSpec,
    )

    job = defs.resolve_job_def("train_and_evaluate")
    schema = job.run_config_schema.config_type
    ops = schema.fields["ops"].config_type.fields
    resources = schema.fields["resources"].config_type.fields

    def names(node: str, section: str = "config") -> set[str]:
        return set(ops[node].config_type.fields[section].config_type.fields)

    def resource_names(key: str) -> set[str]:
        return set(resources[key].config_type.fields["config"].config_type.fields)

    expected = {
        "raw_dialogsum": DataSpec, "filtered_split": FilterSpec, "tokenized_dataset": TokenizeSpec, "lora_adapter": TrainSpec,
        "base_predictions": GenerationSpec, "tuned_predictions": GenerationSpec, "bertscore_report": ReportSpec,
        "promoted_adapter": PromotionSpec,
    }
    for node, spec in expected.items():
        assert {f.name for f in fields(spec)} <= names(node), node
    assert {f.name for f in fields(ModelChoice)} - {"online_equivalent"} <= resource_names("model")
    assert {f.name for f in fields(BertScoreSpec)} <= resource_names("scorer")
    assert resource_names("profile") == {"name"}


ML_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "bert_score", "accelerate", "trl")
LOAD_THE_CODE_LOCATION = """
import sys
import lorasum_assets.definitions as definitions
repository = definitions.defs.get_repository_def()  # what a code server builds: jobs, resources, schedules
assert repository.get_all_jobs()
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in {libraries!r})))
"""


def test_loading_the_code_location_imports_no_ml_library():
    """Every Dagster process (code servers, daemon, run and step workers) loads the definitions:
    the ML libraries are imported where they run, never by that."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LOAD_THE_CODE_LOCATION.format(libraries=set(ML_LIBRARIES))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"loading the definitions imported {done.stdout.strip()}"


def test_the_recipe_profile_trains_as_the_notebook_and_the_default_on_every_linear_layer():
    from lorasum_assets.settings.profiles import get_profile

    notebook = get_profile("llama-3.2-3b-qlora").training
    assert (notebook.lora_r, notebook.lora_alpha, notebook.lora_dropout, notebook.target_modules) == (16, 32, 0.1, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert (notebook.batch_size, notebook.gradient_accumulation_steps, notebook.learning_rate, notebook.lr_scheduler, notebook.epochs) == (1, 4, 2e-4, "cosine", 5)
    assert notebook.gradient_checkpointing
    default = get_profile("smollm2-135m").training  # docs/results.md: the sweep that chose it
    assert (default.target_modules, default.lora_r, default.learning_rate, default.epochs) == (("all-linear",), 16, 1e-3, 2)
