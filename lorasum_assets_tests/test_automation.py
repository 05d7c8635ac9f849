
import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from dagster._utils.schedules import cron_string_iterator  # the iterator Dagster's daemon ticks with

from lorasum_assets.defs.schedules import InvalidCronError, build_retrain_schedule
from lorasum_assets.defs.sensors import record_run_failures, retrain_on_data_change
from lorasum_assets.ml.data.dialogues import load_local
from lorasum_assets_tests.helpers import history_of


def test_schedule_is_weekly_and_stopped_by_default(monkeypatch):
    monkeypatch.delenv("LORASUM_RETRAIN_CRON", raising=False)
    schedule = build_retrain_schedule()
    start = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    ticks = cron_string_iterator(start, schedule.cron_schedule, schedule.execution_timezone or "UTC")
    first, second = next(ticks), next(ticks)
    assert second - first == timedelta(days=7) and first.hour == 3  # weekly, at night
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "train_and_evaluate"


def test_schedule_cron_is_configurable_and_validated(monkeypatch):
    monkeypatch.setenv("LORASUM_RETRAIN_CRON", "30 2 * * *")
    assert build_retrain_schedule().cron_schedule == "30 2 * * *"
    monkeypatch.setenv("LORASUM_RETRAIN_CRON", "every tuesday")
    with pytest.raises(InvalidCronError, match="not a valid cron"):
        build_retrain_schedule()


def dialogue(split: str, i: int) -> dict:
    return {"id": f"{split}_{i}", "dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi.", "summary": f"They greet {i}.", "topic": "t"}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def tick(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("LORASUM_WATCH_PATH", str(data))
    instance = dg.DagsterInstance.ephemeral()

    def evaluate(cursor):
        context = dg.build_sensor_context(cursor=cursor, instance=instance)
        return retrain_on_data_change(context), context.cursor

    evaluate.data = data
    return evaluate


def test_sensor_fires_once_per_change(tick):
    data = tick.data
    write_jsonl(data / "train.jsonl", [dialogue("train", 0)])
    write_jsonl(data / "test.jsonl", [dialogue("test", 0)])

    result, cursor = tick(None)
    assert isinstance(result, dg.SkipReason) and result.skip_message.startswith("now watching")  # the first look only records the state
    older_cursor = json.loads(cursor)["fingerprint"]  # what an older lorasum kept
    assert tick(older_cursor)[0].skip_message.startswith("no change")
    result, cursor2 = tick(cursor)
    assert isinstance(result, dg.SkipReason) and cursor2 == cursor

    write_jsonl(data / "train.jsonl", [dialogue("train", 0), dialogue("train", 1)])
    result, cursor3 = tick(cursor2)
    assert isinstance(result, dg.RunRequest)
    assert result.run_config["ops"]["raw_dialogsum"]["config"] == {"source": "local", "path": str(data)}
    assert cursor3 != cursor2
    result, cursor4 = tick(cursor3)
    assert isinstance(result, dg.SkipReason) and cursor4 == cursor3  # the same change does not fire twice

    write_jsonl(data / "validation.jsonl", [dialogue("validation", 0)])
    result, _ = tick(cursor4)
    assert isinstance(result, dg.RunRequest) and result.run_key != f"data-{cursor3}"


def test_sensor_skips_a_change_raw_dialogsum_would_reject_with_its_reason(tick):
    data = tick.data
    write_jsonl(data / "train.jsonl", [dialogue("train", 0)])
    _, cursor = tick(None)

    write_jsonl(data / "train.jsonl", [{"text": "a", "label": "b"}])
    result, cursor2 = tick(cursor)
    assert isinstance(result, dg.SkipReason)
    assert "raw_dialogsum would fail" in result.skip_message and "wrong columns" in result.skip_message
    result, cursor3 = tick(cursor2)
    assert result.skip_message.startswith("still not retraining") and "wrong columns" in result.skip_message
    assert cursor3 == cursor2  # the same data is not read again

    write_jsonl(data / "train.jsonl", [dialogue("train", 0)])
    result, _ = tick(cursor3)
    assert isinstance(result, dg.RunRequest)  # fixed: the next change runs


def test_sensor_accepts_one_file_with_a_split_column_as_the_reader_does(tick):
    rows = [{**dialogue("train", 0), "split": "train"}, {**dialogue("test", 0), "split": "test"}]
    write_jsonl(tick.data / "dialogues.jsonl", rows)  # the bundled sample's layout
    result, cursor = tick(None)
    assert result.skip_message.startswith("now watching"), result.skip_message
    loaded = load_local(tick.data)
    assert loaded.kept_counts() == {"train": 1, "test": 1}

    write_jsonl(tick.data / "dialogues.jsonl", [dialogue("train", 0)])  # no split column, and no split in the name
    result, _ = tick(cursor)
    assert "cannot tell the split" in result.skip_message


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
    rows = con.execute("SELECT run_id, job_name, error FROM run_failures").fetchall()
    assert rows == [(result.run_id, result.dagster_run.job_name, "always_fails: RuntimeError: the GPU caught fire")]
