"""Our scoring agrees with bert_score and rouge_score called directly."""

import bert_score
import pytest
from rouge_score import rouge_scorer

from lorasum_assets.ml.evaluation.bertscore import BertScoreModel, BertScoreSpec, package_minilm_path
from lorasum_assets.ml.evaluation.rouge import rouge_scores
from lorasum_assets.ml.evaluation.scoring import metric_value, score_predictions
from lorasum_assets.ml.evaluation.stats import bootstrap_ci, paired_bootstrap_ci

CANDS = ["#Person1# books a table for two.", "They plan a trip to the lake.", ""]
REFS = [
    ["#Person1# reserves a table for two people.", "A table for two is booked."],
    ["#Person2# and #Person1# plan a weekend trip to the lake."],
    ["Somebody says something."],
]


@pytest.fixture(scope="module")
def minilm():
    return BertScoreModel(BertScoreSpec(model="all-MiniLM-L6-v2", model_path=package_minilm_path(), num_layers=6))


def test_bertscore_matches_bert_score_directly(minilm):
    p, r, f = minilm(CANDS, REFS)
    direct = {}
    for i, (cand, refs) in enumerate(zip(CANDS[:2], REFS[:2])):
        dp, dr, df = bert_score.score([cand] * len(refs), refs, model_type=package_minilm_path(), num_layers=6)
        best = int(df.argmax())
        direct[i] = (float(dp[best]), float(dr[best]), float(df[best]))
    for i in (0, 1):
        assert (p[i], r[i], f[i]) == pytest.approx(direct[i], abs=1e-5)
    assert (p[2], r[2], f[2]) == (0.0, 0.0, 0.0)  # empty candidate scores 0 explicitly
    # the hash names the model as published scores do, not the folder it happens to be in here
    assert minilm.hash.startswith("all-MiniLM-L6-v2_L6_no-idf_version=") and str(package_minilm_path()) not in minilm.hash


def test_rouge_matches_rouge_score_directly():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    ours = rouge_scores(CANDS, REFS)
    for i in (0, 1):
        for key in ours:
            best = max(scorer.score(ref, CANDS[i])[key].fmeasure for ref in REFS[i])
            assert ours[key][i] == pytest.approx(best)
    assert all(ours[k][2] == 0.0 for k in ours)


def test_rescaling_without_a_baseline_file_is_an_error():
    with pytest.raises(FileNotFoundError, match="no baseline file"):
        BertScoreModel(BertScoreSpec(model="all-MiniLM-L6-v2", model_path=package_minilm_path(), num_layers=6, rescale_with_baseline=True))


def test_num_layers_is_required():
    with pytest.raises(ValueError, match="num_layers"):
        BertScoreModel(BertScoreSpec(model="x", num_layers=None))


def test_the_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    """On 300 samples of 50 draws from N(0.5, 0.1²), the CI holds 0.5 in 88–99% of them (a 95%
    interval's coverage, binomial spread ±2.5 points; the percentile bootstrap undercovers a little
    at n=50); its width is within 15% of the normal theory's 2·1.96·σ/√n."""
    import numpy as np

    rng = np.random.default_rng(3)
    samples = rng.normal(0.5, 0.1, size=(300, 50))
    intervals = [bootstrap_ci(s, seed=i) for i, s in enumerate(samples)]
    coverage = sum(ci.low <= 0.5 <= ci.high for ci in intervals) / len(intervals)
    width = float(np.median([ci.high - ci.low for ci in intervals]))
    print(f"coverage {coverage:.3f}, median width {width:.4f}")
    assert 0.88 <= coverage <= 0.99
    assert abs(width / (2 * 1.96 * 0.1 / 50**0.5) - 1) <= 0.15


def test_the_paired_ci_is_of_the_per_example_change():
    values = [0.1, 0.5, 0.9, 0.4, 0.6]
    delta = paired_bootstrap_ci([v + 0.1 for v in values], values)  # every example moved by exactly +0.1
    assert delta.low == pytest.approx(0.1) and delta.high == pytest.approx(0.1)
    unpaired = bootstrap_ci([v + 0.1 for v in values])
    unpaired_width = unpaired.high - unpaired.low
    assert unpaired_width > 0.2  # the same scores treated as unpaired would hide the change in spread
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_ci([0.1, 0.2], [0.1])


def test_report_scores_multi_reference_and_first_reference(minilm):
    report = score_predictions(minilm, {"base": ["", "x", "y"], "tuned": CANDS}, REFS, n_resamples=200)
    assert {m["reference_set"] for m in report.metrics} == {"all", "first"}
    assert report.empty_predictions == {"base": 1, "tuned": 1}
    all_f1 = metric_value(report, "tuned", "rouge1", "all")["value"]
    first_f1 = metric_value(report, "tuned", "rouge1", "first")["value"]
    assert all_f1 >= first_f1


def test_model_text_is_shown_as_text_not_markup():
    from lorasum_assets.defs.assets.plots import escape_markdown, markdown_table

    prediction = "~struck~ *bold* <b>x</b> [link](http://x) | #tag `code`\nnext"
    table = markdown_table(["id", "tuned"], [("a", prediction)])
    row = table.splitlines()[2]
    assert row.count("|") - row.count("\\|") == 3  # the pipe inside the text does not open a column
    for markup in ("~struck~", "*bold*", "<b>", "[link]", "`code`"):
        assert markup not in row
    assert escape_markdown("~a~") == "\\~a\\~" and "\n" not in escape_markdown("a\nb")


def test_an_undefined_percentage_reads_n_a():
    from lorasum_assets.ml.evaluation.stats import percent_difference

    assert percent_difference(0.0, 0.25) == "n/a"  # ROUGE-2 of a base that shares no bigram
    assert percent_difference(float("nan"), 0.25) == "n/a"
    assert percent_difference(0.5, 0.75) == "+50.00%"


def test_the_non_inferiority_check_passes_fails_and_refuses_to_decide_as_it_should():
    import numpy as np

    from lorasum_assets.ml.evaluation.stats import non_inferiority

    rng = np.random.default_rng(0)
    reference = rng.uniform(0.3, 0.9, size=400)
    same = non_inferiority(reference + rng.normal(0, 0.005, size=400), reference)
    degraded = non_inferiority(reference - 0.03 + rng.normal(0, 0.005, size=400), reference)  # a 3-point loss
    noisy = non_inferiority(reference[:40] + rng.normal(0, 0.2, size=40), reference[:40])
    print(same.verdict(), degraded.verdict(), noisy.verdict(), sep="\n")
    assert same.decided and same.passed and same.verdict().startswith("non-inferior")
    assert degraded.decided and not degraded.passed and degraded.verdict().startswith("FAILED")
    assert not noisy.decided and not noisy.passed and noisy.verdict().startswith("cannot decide")
    assert noisy.examples_needed() > 40
    narrow_but_below = non_inferiority(reference - 0.0105 + rng.normal(0, 0.01, size=400), reference)
    assert narrow_but_below.width < 0.01 and narrow_but_below.change.high > -0.01 and not narrow_but_below.passed
    assert narrow_but_below.verdict().startswith("FAILED")
