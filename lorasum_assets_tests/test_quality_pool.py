"""The decoder quality check never scores the tuned model on a dialogue its adapter trained on."""

from benchmarks.quality import evaluation_dialogues


def test_pool_all_leaves_out_only_the_adapters_training_dialogues():
    dev = [f"dev-{i}" for i in range(10)]
    test = [f"test-{i}" for i in range(6)]

    compared = evaluation_dialogues(dev, test, count=4, train=3, pool="all")

    assert compared["base"] == test + dev
    assert compared["tuned"] == test + dev[3:]
    assert not set(compared["tuned"]) & set(dev[:3])


def test_pool_test_spreads_the_count_over_the_test_split_for_both_models():
    test = [f"test-{i}" for i in range(10)]

    compared = evaluation_dialogues(["dev-0"], test, count=3, train=1, pool="test")

    assert compared["base"] == compared["tuned"] == ["test-0", "test-3", "test-6"]
