import dataclasses

import pytest

from lorasum_assets.settings.profiles import PROFILES, UnknownProfileError, get_profile, with_overrides
from lorasum_assets.settings.specs import TrainSpec


def test_the_default_profile_runs_offline_on_a_model_a_package_ships(monkeypatch):
    """What the README's ``make demo`` relies on: no profile named, no hub, a model file on disk."""
    from lorasum_assets.ml.models.loading import packaged_gguf_path

    monkeypatch.delenv("LORASUM_PROFILE", raising=False)
    model = get_profile().model.model
    assert model.startswith("gguf:"), model
    assert packaged_gguf_path(model).is_file()


def test_environment_variable_picks_the_profile(monkeypatch):
    monkeypatch.delenv("LORASUM_PROFILE", raising=False)
    default = get_profile()
    other = next(name for name in PROFILES if name != default.name)
    monkeypatch.setenv("LORASUM_PROFILE", other)
    assert get_profile() is PROFILES[other] and get_profile().model != default.model


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(UnknownProfileError) as excinfo:
        get_profile("gpt-17")
    message = str(excinfo.value)
    assert "gpt-17" in message
    for name in PROFILES:
        assert name in message


def test_overrides_change_only_the_given_fields():
    spec = with_overrides(TrainSpec(), {"epochs": 1, "target_modules": ["q_proj"], "learning_rate": None})
    assert spec == dataclasses.replace(TrainSpec(), epochs=1, target_modules=("q_proj",))  # None keeps the field
    with pytest.raises(ValueError, match="unknown field"):
        with_overrides(TrainSpec(), {"epoch": 1})
