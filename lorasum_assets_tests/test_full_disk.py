"""A full disk while an adapter or a checkpoint is written: the step fails naming the path and the
space needed, leaves no partial folder and no registry row, and the production alias stays.
Tested on a small tmpfs the test mounts (CI runs as root); skipped, with the reason, elsewhere."""

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import error_text, history_of

TINY_FS = "48k"  # the tiny model's adapter and tokenizer files take about 90 kB


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    mount_point = tmp_path / f"small-disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TINY_FS}", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def materialize(selection, run_config=None, instance=None):
    return dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")),
                          instance=instance or dg.DagsterInstance.ephemeral(), selection=selection,
                          run_config=run_config or {}, raise_on_error=False)


def rows(home, sql: str) -> list[tuple]:
    con = history_of(home)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_full_disk_while_the_adapter_is_written_fails_cleanly(fresh_home, small_disk):
    first = materialize("*")  # a production adapter that must stay production
    assert first.success
    production_before = rows(fresh_home, "SELECT adapter_id FROM production_adapters")
    adapters_before = rows(fresh_home, "SELECT adapter_id FROM adapters")
    (fresh_home / "adapters").rename(fresh_home / "adapters-kept")
    (fresh_home / "adapters").symlink_to(small_disk)

    failed = materialize("*lora_adapter", {"ops": {"lora_adapter": {"config": {"learning_rate": 1e-3}}}})
    message = error_text(failed)
    print(message.splitlines()[-1] if message else "")
    assert not failed.success
    assert "no space left to write the adapter" in message and str(fresh_home / "adapters") in message
    assert "it needs at least" in message and "free there" in message
    assert list(small_disk.iterdir()) == []  # no partial adapter folder, no staging folder
    assert rows(fresh_home, "SELECT adapter_id FROM adapters") == adapters_before
    assert rows(fresh_home, "SELECT adapter_id FROM production_adapters") == production_before


def test_a_full_disk_while_a_checkpoint_is_written_fails_cleanly(fresh_home, small_disk):
    (fresh_home / "checkpoints").mkdir(parents=True, exist_ok=True)
    (fresh_home / "checkpoints").rmdir()
    (fresh_home / "checkpoints").symlink_to(small_disk)

    failed = materialize("*lora_adapter", {"ops": {"lora_adapter": {"config": {"checkpoint_steps": 1}}}})
    message = error_text(failed)
    print(message.splitlines()[-1] if message else "")
    assert not failed.success
    assert "no space left to write the checkpoint of step 1" in message and str(fresh_home / "checkpoints") in message
    assert "it needs at least" in message
    leftovers = [p for p in small_disk.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # the partial checkpoint was removed
    assert rows(fresh_home, "SELECT count(*) FROM adapters") == [(0,)]
