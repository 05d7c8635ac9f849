"""A damaged or missing adapter is refused by every reader of its files, with both hashes and the
path named, and nothing is written: summarize, export-model (adapter and merged), the evaluate
job's tuned_predictions, and promote. ``lorasum adapters --verify`` reports each adapter."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.ml.models.adapter_files import AdapterFilesError, AdapterMissingError, sha256_file, verify_adapter_files
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets.tools.cli import main
from lorasum_assets_tests.helpers import error_text, history_of

EVALUATION = dg.AssetSelection.assets("base_predictions", "tuned_predictions", "bertscore_report")


def materialize(instance, selection, run_config=None):
    return dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=instance,
                          selection=selection, run_config=run_config or {}, raise_on_error=False)


def counts(home) -> dict[str, int]:
    con = history_of(home)
    try:
        return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("promotions", "eval_runs", "tuned_predictions")}
    finally:
        con.close()


def refused(capsys, argv: list[str]) -> str:
    """What the command printed when it refused (it exits 1)."""
    capsys.readouterr()
    assert main(argv) == 1
    return capsys.readouterr().err


def test_the_check_names_the_file_and_both_hashes(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    good = sha256_file(folder / "adapter_model.safetensors")
    assert verify_adapter_files("a1", folder, good) == folder
    with pytest.raises(AdapterFilesError) as damaged:
        verify_adapter_files("a1", folder, "0" * 64)
    assert str(damaged.value) == (f"adapter a1 is damaged: {folder}/adapter_model.safetensors has sha256 {good}, "
                                  f"the registry recorded {'0' * 64}; refusing to use it")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterMissingError, match=f"adapter_config.json missing in {folder}"):
        verify_adapter_files("a1", folder, good)
    shutil.rmtree(folder)
    with pytest.raises(AdapterMissingError, match=f"the folder {folder} is gone"):
        verify_adapter_files("a1", folder, good)


def test_a_damaged_or_missing_adapter_is_refused_everywhere_and_nothing_is_written(fresh_home, tmp_path, capsys):
    instance = dg.DagsterInstance.ephemeral()
    trained = materialize(instance, "*")
    assert trained.success
    adapter = trained.asset_materializations_for_node("lora_adapter")[0].metadata["lorasum/reference"].value
    adapter_id, folder = adapter["adapter_id"], Path(adapter["path"])
    weights = folder / "adapter_model.safetensors"
    original = weights.read_bytes()
    # The alias goes back to the base model alone (no adapter files read), so that promote has work to do.
    assert main(["rollback", "--reason", "test"]) == 0
    dialogue = tmp_path / "dialogues.jsonl"
    dialogue.write_text(json.dumps({"id": "d1", "dialogue": "#Person1#: Hi. #Person2#: Hello."}) + "\n")

    def every_reader_refuses(expect: str) -> None:
        before = counts(fresh_home)
        summaries = tmp_path / "summaries.jsonl"
        assert expect in refused(capsys, ["summarize", "--adapter", adapter_id, "--input", str(dialogue), "--output", str(summaries)])
        assert not summaries.exists() and not summaries.with_name(summaries.name + ".partial").exists()
        for merged in ([], ["--merged"]):
            out = tmp_path / f"export{'-merged' if merged else ''}"
            assert expect in refused(capsys, ["export-model", adapter_id, str(out), *merged])
            assert not out.exists()
        assert expect in refused(capsys, ["promote", adapter_id, "--reason", "test"])
        evaluated = materialize(instance, EVALUATION, {"ops": {"tuned_predictions": {"config": {"adapter_id": adapter_id}}}})
        assert not evaluated.success and expect in error_text(evaluated)
        assert not evaluated.asset_materializations_for_node("tuned_predictions")
        after = counts(fresh_home)
        assert after["promotions"] == before["promotions"] and after["eval_runs"] == before["eval_runs"]
        assert after["tuned_predictions"] == before["tuned_predictions"]  # base_predictions of the failed run may be written

    # four bytes overwritten in the middle of the weights
    damaged = bytearray(original)
    damaged[len(damaged) // 2: len(damaged) // 2 + 4] = b"\xde\xad\xbe\xef"
    weights.write_bytes(bytes(damaged))
    every_reader_refuses(f"adapter {adapter_id} is damaged: {weights} has sha256 {sha256_file(weights)}, "
                         f"the registry recorded {adapter['sha256']}")
    assert main(["adapters", "--verify"]) == 1
    printed = capsys.readouterr().out
    print(printed)
    assert adapter_id in printed and "damaged" in printed

    # the folder gone
    shutil.move(folder, tmp_path / "moved-away")
    every_reader_refuses(f"adapter {adapter_id} cannot be used: the folder {folder} is gone")
    assert main(["adapters", "--verify", "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert (row["adapter_id"], row["status"]) == (adapter_id, "missing")

    # put back as it was: every reader takes it again
    shutil.move(tmp_path / "moved-away", folder)
    weights.write_bytes(original)
    assert main(["adapters", "--verify", "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["ok"]
    assert main(["promote", adapter_id, "--reason", "test"]) == 0
    assert main(["export-model", adapter_id, str(tmp_path / "export-ok")]) == 0
    assert (tmp_path / "export-ok" / "adapter_model.safetensors").read_bytes() == original
