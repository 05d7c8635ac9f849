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
}
EXPECTED_GROUPS = {
    "raw_dialogsum": "data",
    "filtered_split": "data",
    "tokenized_dataset": "data",
    "lora_adapter": "training",
    "base_predictions": "evaluation",
    "tuned_predictions": "evaluation",
    "bertscore_report": "evaluation",
}


def test_definitions_load_with_exactly_seven_assets_and_edges():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_DEPS)
    for key, deps in EXPECTED_DEPS.items():
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey(key)).parent_keys}
        assert parents == deps, key


def test_groups_kinds_and_code_versions():
    graph = defs.resolve_asset_graph()
    for key, group in EXPECTED_GROUPS.items():
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group
        assert node.kinds, key
        assert node.code_version, key


def test_gpu_steps_share_a_pool_and_the_job_runs_in_process():
    for key in ("lora_adapter", "base_predictions", "tuned_predictions"):
        assert defs.resolve_assets_def(key).node_def.pool == "lorasum_gpu"
    job = defs.resolve_job_def("train_and_evaluate")
    assert job.executor_def.name == "in_process"


def test_resources_follow_the_profile(monkeypatch):
    from lorasum_assets.profiles import get_profile
    from lorasum_assets.resources.factory import build_resources

    resources = build_resources(get_profile("llama-3.2-3b-qlora"))
    assert resources["model"].model == "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"
    assert resources["model"].quantization == "nf4"
    assert resources["model"].trust_remote_code is False
    assert resources["scorer"].model == "roberta-large" and resources["scorer"].num_layers == 17
