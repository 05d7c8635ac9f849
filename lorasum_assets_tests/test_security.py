"""Secrets stay out of logs and the history; no remote code, safe weight loading, paths kept in the home."""

import json
import re

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import REPO, history_of


def test_hf_token_never_reaches_logs_metadata_or_duckdb(fresh_home, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    resources = build_resources(get_profile("tiny"))
    token = resources["model"].data["hf_token"]
    assert isinstance(token, dg.EnvVar) and token == "HF_TOKEN"  # the name, not the value
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=resources, instance=instance)
    assert result.success
    logs = "\n".join(str(entry) for entry in instance.all_logs(result.run_id))
    assert secret not in logs
    run_config = json.dumps(result.dagster_run.run_config, default=str)
    assert secret not in run_config
    con = history_of(fresh_home)
    tables = con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'lorasum' AND table_type = 'BASE TABLE'").fetchall()
    assert len(tables) > 10
    for (table,) in tables:
        dump = json.dumps(con.execute(f'SELECT * FROM lorasum.main."{table}"').fetchall(), default=str)
        assert secret not in dump, table
    for path in (fresh_home / "history").rglob("*"):  # the catalog (inlined rows too) and every data file
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for path in (fresh_home / "adapters").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md"):
            assert secret not in path.read_text(errors="ignore")


def test_remote_code_is_off_unless_a_profile_turns_it_on():
    from lorasum_assets.defs.resources import LoraModelResource, ProfileResource
    from lorasum_assets.ml.models.loading import ModelSpec
    from lorasum_assets.settings.profiles import PROFILES

    assert ModelSpec(model="x").trust_remote_code is False
    assert LoraModelResource(profile=ProfileResource(name="tiny"), model="x").choice().trust_remote_code is False
    assert all(p.model.trust_remote_code is False for p in PROFILES.values())


def test_weights_load_with_safetensors_and_torch_load_is_weights_only(tiny_model_dir, monkeypatch):
    import transformers

    from lorasum_assets.ml.models.loading import ModelSpec, load_model

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw) or original(path, **kw))
    load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    for source in (REPO / "lorasum_assets").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", source.read_text()):
            assert "weights_only=True" in call, f"{source}: {call}"


def test_paths_cannot_climb_out_of_the_home(fresh_home):
    from lorasum_assets.ml.models.loading import ModelSpec, resolve_model_path
    from lorasum_assets.runtime.home import UnsafePathError, home_subdir

    assert home_subdir("adapters") == fresh_home / "adapters"
    for bad in (("..", "elsewhere"), ("adapters", "..", "..", "x"), ("/etc",)):
        with pytest.raises(UnsafePathError):
            home_subdir(*bad)
    # a GGUF model name with traversal still lands in the model cache (only the file stem is used)
    with pytest.raises(FileNotFoundError):
        resolve_model_path(ModelSpec(model="gguf:no_such_package/../../../../tmp/evil.gguf", cache_dir=str(fresh_home / "models")))
    assert not (fresh_home.parent / "evil").exists()


def test_dependencies_have_upper_bounds_and_the_ui_binds_localhost():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert "<" in requirement or "==" in requirement, f"{requirement} has no upper bound"
    ui_recipe = (REPO / "Makefile").read_text().split("\nui:")[1].split("\n\n")[0]
    assert "--host 127.0.0.1" in ui_recipe
