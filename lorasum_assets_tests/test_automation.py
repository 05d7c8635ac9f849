
import dagster as dg
import pytest

from lorasum_assets.defs.schedules import DEFAULT_RETRAIN_CRON, InvalidCronError, build_retrain_schedule
from lorasum_assets.defs.sensors import record_run_failures, retrain_on_data_change
from lorasum_assets_tests.conftest import history_of


def test_schedule_is_weekly_and_stopped_by_default(monkeypatch):
    monkeypatch.delenv("LORASUM_RETRAIN_CRON", raising=False)
    schedule = build_retrain_schedule()
    assert schedule.cron_schedule == DEFAULT_RETRAIN_CRON == "0 3 * * 1"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "train_and_evaluate"


def test_schedule_cron_is_configurable_and_validated(monkeypatch):
    monkeypatch.setenv("LORASUM_RETRAIN_CRON", "30 2 * * *")
    assert build_retrain_schedule().cron_schedule == "30 2 * * *"
    monkeypatch.setenv("LORASUM_RETRAIN_CRON", "every tuesday")
    with pytest.raises(InvalidCronError, match="not a valid cron"):
        build_retrain_schedule()


def test_sensor_fires_once_per_change(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"id": "a"}\n')
    monkeypatch.setenv("LORASUM_WATCH_PATH", str(data))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        context = dg.build_sensor_context(cursor=cursor, instance=instance)
        result = retrain_on_data_change(context)
        return result, context.cursor

    result, cursor = tick(None)
    assert isinstance(result, dg.SkipReason)  # first look only records the state
    result, cursor2 = tick(cursor)
    assert isinstance(result, dg.SkipReason) and cursor2 == cursor

    (data / "train.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    result, cursor3 = tick(cursor2)
    assert isinstance(result, dg.RunRequest)
    assert result.run_config["ops"]["raw_dialogsum"]["config"] == {"source": "local", "path": str(data)}
    assert cursor3 != cursor2
    result, cursor4 = tick(cursor3)
    assert isinstance(result, dg.SkipReason) and cursor4 == cursor3  # the same change does not fire twice

    (data / "test.jsonl").write_text("{}\n")
    result, _ = tick(cursor4)
    assert isinstance(result, dg.RunRequest) and result.run_key != f"data-{cursor3}"


def test_run_failure_sensor_records_the_failure(fresh_home):
    @dg.asset
    def always_fails():
        raise RuntimeError("the GPU caught fire")

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([always_fails], instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    context = dg.build_run_status_sensor_context(
        sensor_name="record_run_failures", dagster_event=failure, dagster_instance=instance, dagster_run=result.dagster_run
    ).for_run_failure()
    record_run_failures(context)
    con = history_of(fresh_home)
    rows = con.execute("SELECT run_id, job_name FROM run_failures").fetchall()
    assert rows == [(result.run_id, result.dagster_run.job_name)]
