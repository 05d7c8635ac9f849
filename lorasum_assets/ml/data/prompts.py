"""The notebook's prompt, and the token layout of a training example."""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
# Where the prompt ends and the summary begins. "natural": the prompt ends at "Summary:" and the
# summary starts with its own space, so ':' is followed by the summary's first word token (' #'),
# as ordinary tokenization writes it. "notebook": "Summary: " and the summary tokenized apart, which
# puts a lone ' ' token before every summary, a sequence the tokenizer never produces.
BOUNDARIES = ("natural", "notebook")
# Llama 3.2's chat template stamps today's date into the system header unless one is given.
FIXED_DATE_STRING = "26 Jul 2024"
IGNORE_INDEX = -100


class SummaryTooLongError(ValueError):
    """The summary alone does not fit in max_length; we never truncate a summary."""


def trained_prompt_format(training_config: dict) -> tuple[bool, str]:
    """(use_chat_template, boundary) an adapter was trained with, from its registered config.
    Adapters registered before the boundary was recorded were trained at the notebook's."""
    return bool(training_config.get("use_chat_template", False)), training_config.get("prompt_boundary", "notebook")


def _check_boundary(boundary: str) -> None:
    if boundary not in BOUNDARIES:
        raise ValueError(f"prompt boundary must be one of {BOUNDARIES}, got {boundary!r}")


def render_prompt(dialogue: str, tokenizer=None, use_chat_template: bool = False, boundary: str = "natural") -> str:
    _check_boundary(boundary)
    prompt = PROMPT_TEMPLATE.format(dialogue=dialogue)
    if not use_chat_template:
        return prompt.rstrip(" ") if boundary == "natural" else prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template=True needs a tokenizer that has a chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        date_string=FIXED_DATE_STRING,
    )


def _encode_text(tokenizer, text: str, use_chat_template: bool) -> list[int]:
    # A chat template already writes the BOS text; letting the tokenizer add one would double it.
    ids = list(tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids = ids[:-1]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def completion_text(summary: str, use_chat_template: bool = False, boundary: str = "natural") -> str:
    """The summary as it follows the prompt: with its leading space at the natural boundary (a chat
    template's assistant header ends the prompt, so no space is added there)."""
    _check_boundary(boundary)
    return " " + summary if boundary == "natural" and not use_chat_template else summary


def encode_prompt(
    tokenizer,
    dialogue: str,
    use_chat_template: bool = False,
    max_prompt_tokens: int | None = None,
    boundary: str = "natural",
) -> tuple[list[int], bool]:
    """Token ids of the prompt, the dialogue cut from the end until it fits.

    Training and generation both call this, so a truncated prompt looks the same to both.
    Returns the ids and whether the dialogue was truncated.
    """
    ids = _encode_text(tokenizer, render_prompt(dialogue, tokenizer, use_chat_template, boundary), use_chat_template)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return ids, False
    empty = _encode_text(tokenizer, render_prompt("", tokenizer, use_chat_template, boundary), use_chat_template)
    if len(empty) >= max_prompt_tokens:
        raise SummaryTooLongError(
            f"only {max_prompt_tokens} tokens left for the prompt, which needs {len(empty)} without any dialogue"
        )
    offsets = tokenizer(dialogue, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(offsets) - (len(ids) - max_prompt_tokens)
    while keep > 0:
        cut = dialogue[: offsets[keep - 1][1]].rstrip()
        ids = _encode_text(tokenizer, render_prompt(cut, tokenizer, use_chat_template, boundary), use_chat_template)
        if len(ids) <= max_prompt_tokens:
            return ids, True
        keep -= max(1, len(ids) - max_prompt_tokens)
    return empty, True


def encode_prompts(
    tokenizer, dialogues: list[str], *, use_chat_template: bool, boundary: str, max_prompt_tokens: int | None
) -> list[tuple[list[int], bool]]:
    """``encode_prompt`` of each dialogue: the prompts of one generation run, in one format."""
    return [encode_prompt(tokenizer, d, use_chat_template, max_prompt_tokens, boundary) for d in dialogues]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    truncated: bool


def encode_example(
    tokenizer,
    dialogue: str,
    summary: str,
    max_length: int,
    use_chat_template: bool = False,
    boundary: str = "natural",
) -> TokenizedExample:
    """BOS (once) + prompt + summary + EOS, labels -100 on the prompt.

    Labels are built here, before any padding, so an EOS that shares its id with PAD keeps its label.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    completion = completion_text(summary, use_chat_template, boundary)
    summary_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    budget = max_length - len(summary_ids)
    if budget <= 0:
        raise SummaryTooLongError(f"summary has {len(summary_ids)} tokens with EOS, max_length is {max_length}")
    prompt_ids, truncated = encode_prompt(tokenizer, dialogue, use_chat_template, budget, boundary)
    return TokenizedExample(
        input_ids=prompt_ids + summary_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + summary_ids,
        prompt_tokens=len(prompt_ids),
        truncated=truncated,
    )


def required_max_length(
    tokenizer, summaries: dict[str, str], use_chat_template: bool = False, boundary: str = "natural"
) -> tuple[int, str, int, int]:
    """The smallest max_length that fits the prompt frame, the longest summary with its EOS and at
    least one dialogue token: (required, id of the longest summary, its tokens, frame tokens)."""
    frame = len(encode_prompt(tokenizer, "", use_chat_template, boundary=boundary)[0])
    longest_id, longest = "", 0
    for row_id, summary in summaries.items():
        n = len(tokenizer(completion_text(summary, use_chat_template, boundary), add_special_tokens=False)["input_ids"]) + 1
        if n > longest:
            longest_id, longest = row_id, n
    return frame + longest + 1, longest_id, longest, frame
