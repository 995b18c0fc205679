"""Contrastive datasets: shipped files, validation reports by file and line, hashing, and exact token masks."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings

import pytest
import torch

import traitlens
from conftest import make_tiny_model
from traitlens.dataset import (
    SPLITS,
    DatasetError,
    Example,
    Pair,
    available_datasets,
    check_position,
    encode_examples,
    load_dataset,
)
from traitlens.pipeline import default_position, extract_trait

SHIPPED = {  # name: (kind, train, val, test), as documented in data/FORMAT.md
    "sentiment": ("plain", 91, 19, 19),
    "formality": ("prompt", 90, 19, 19),
    "certainty": ("prompt", 87, 18, 18),
}


def _norm(text):
    return None if text is None else " ".join(text.split()).casefold()


# ------------------------------------------------------------------------------------- shipped data


def test_available_datasets_lists_the_shipped_traits():
    assert available_datasets() == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_dataset_sizes_and_splits(name):
    ds = load_dataset(name)
    kind, *sizes = SHIPPED[name]
    assert ds.name == name
    assert ds.kind == kind
    assert len(ds) >= 120
    assert ds.sizes == dict(zip(SPLITS, sizes, strict=True))
    assert all(n > 0 for n in ds.sizes.values())
    assert len(ds.train) + len(ds.val) + len(ds.test) == len(ds)
    assert {p.split for p in ds.train} == {"train"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_dataset_has_no_duplicates_or_leaks(name):
    # Independent of the loader: read the raw lines with json and compare normalised texts.
    path = load_dataset(name).path
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    texts_by_split = {s: set() for s in SPLITS}
    for row in rows:
        assert _norm(row["pos"]) != _norm(row["neg"])
        assert row["pos"].strip() and row["neg"].strip()
        for side in ("pos", "neg"):
            texts_by_split[row["split"]].add((row.get("prompt"), _norm(row[side])))
    all_texts = [(r.get("prompt"), _norm(r[side])) for r in rows for side in ("pos", "neg")]
    assert len(all_texts) == len(set(all_texts))
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not texts_by_split[a] & texts_by_split[b]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_examples_are_the_right_kind(name):
    ds = load_dataset(name)
    pos, neg = ds.examples("test")
    assert len(pos) == len(neg) == ds.sizes["test"]
    if SHIPPED[name][0] == "plain":
        assert all(isinstance(x, str) for x in pos + neg)
    else:
        assert all(isinstance(x, Example) and x.response and x.system is None for x in pos + neg)
        assert [x.prompt for x in pos] == [x.prompt for x in neg]


# ------------------------------------------------------------------------------------------- files


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_user_file_by_path_and_hash(tmp_path):
    rows = [
        {"pos": "Good day.", "neg": "Bad day.", "split": "train"},
        {"prompt": "How are you?", "pos": "Great!", "neg": "Awful.", "split": "val", "meta": {"topic": "x"}},
        {"prompt": "Hi.", "system_pos": "Be kind.", "system_neg": "Be rude.", "split": "test"},
    ]
    path = _write(tmp_path, rows)
    ds = load_dataset(path)
    assert ds.name == "data" and ds.path == path and ds.kind == "mixed"
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_dataset(str(path)).sha256 == ds.sha256  # stable across loads
    assert [p.line for p in ds.pairs] == [1, 2, 3]
    assert ds.pairs[1].meta == {"topic": "x"}
    assert ds.pairs[0].pos_example == "Good day."
    assert ds.pairs[1].neg_example == Example(prompt="How are you?", response="Awful.")
    assert ds.pairs[2].pos_example == Example(prompt="Hi.", response="", system="Be kind.")

    path.write_text(
        path.read_text() + json.dumps({"pos": "Fine.", "neg": "Not fine.", "split": "test"}) + "\n"
    )
    assert load_dataset(path).sha256 != ds.sha256


def test_shipped_hash_matches_file_bytes():
    ds = load_dataset("sentiment")
    assert ds.sha256 == hashlib.sha256(ds.path.read_bytes()).hexdigest()
    assert load_dataset("sentiment").sha256 == ds.sha256


def test_unknown_name_suggests_shipped_dataset():
    with pytest.raises(FileNotFoundError, match="did you mean 'sentiment'"):
        load_dataset("sentimnet")
    with pytest.raises(TypeError):
        load_dataset(3)


GOOD = {"pos": "A fine day.", "neg": "A dull day.", "split": "train"}
BAD_ROWS = [
    ('{"pos": "a", "neg": ', "invalid JSON"),
    ('["pos", "neg"]', "must be a JSON object, got list"),
    ({"neg": "No.", "split": "train"}, "missing field 'pos'"),
    ({"pos": "Yes.", "split": "train"}, "missing field 'neg'"),
    ({"pos": "Yes.", "neg": "No."}, "missing field 'split'"),
    ({"pos": "Yes.", "neg": 3, "split": "train"}, "field 'neg' must be a string, got int"),
    ({"pos": "   ", "neg": "No.", "split": "train"}, "field 'pos' is empty"),
    ({"pos": "Yes.", "neg": "No.", "split": "validation"}, "unknown split 'validation'"),
    ({"pos": "Yes.", "neg": "No.", "spilt": "train"}, "unknown field 'spilt'; did you mean 'split'?"),
    (
        {"pos": "Same text.", "neg": "same  TEXT.", "split": "train"},
        "positive and the negative side are the same",
    ),
    (
        {"pos": "Yes.", "neg": "No.", "system_pos": "x", "system_neg": "y", "split": "train"},
        "needs a 'prompt'",
    ),
    ({"prompt": "Q?", "pos": "Yes.", "split": "train"}, "missing field 'neg'"),
    ({"prompt": "Q?", "system_pos": "Be nice.", "split": "train"}, "missing field 'system_neg'"),
    ({"prompt": "Q?", "split": "train"}, "needs answers 'pos' and 'neg' and/or system prompts"),
    ({"prompt": "Q?", "system_pos": "S.", "system_neg": "S.", "split": "train"}, "are the same"),
    ('{"pos": "Yes.", "neg": "No.", "split": "train", "split": "test"}', "'split' given more than once"),
]


def test_a_byte_order_mark_is_read_past_and_a_json_array_is_named(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "pos": "A good day."}])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as some Windows editors save UTF-8
    assert len(load_dataset(path).pairs) == 2
    path.write_text(json.dumps([GOOD, {**GOOD, "pos": "A good day."}], indent=2))
    with pytest.raises(DatasetError) as info:  # was one 'invalid JSON' per line
        load_dataset(path)
    assert [p.message for p in info.value.problems] == [
        "the file is one JSON array, not JSON Lines: write each row as an object on a line of its own"
    ]


@pytest.mark.parametrize(("row", "expected"), BAD_ROWS)
def test_each_bad_row_is_reported_with_file_and_line(tmp_path, row, expected):
    path = _write(tmp_path, [GOOD, row])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert [p.line for p in err.problems] == [2] * len(err.problems)
    assert any(expected in p.message for p in err.problems), err.problems
    assert f"{path}:2: " in str(err)


def test_all_problems_are_reported_at_once(tmp_path):
    rows = [GOOD] + [row for row, _ in BAD_ROWS] + [dict(GOOD, split="test")]
    path = _write(tmp_path, rows)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    lines = {p.line for p in info.value.problems}
    assert lines == set(range(2, len(BAD_ROWS) + 3))  # every bad row, and the cross-split duplicate last
    message = str(info.value)
    assert message.startswith(f"{len(info.value.problems)} problems in dataset {path}")
    for line in (2, 9, len(BAD_ROWS) + 2):
        assert f"{path}:{line}: " in message


def test_duplicates_and_leaks_across_splits(tmp_path):
    rows = [
        {"pos": "The cake is great.", "neg": "The cake is bad.", "split": "train"},  # 1
        {"pos": "The cake is  GREAT.", "neg": "The cake is bad.", "split": "train"},  # 2 duplicate of 1
        {
            "pos": "The tea is great.",
            "neg": "The cake is bad.",
            "split": "train",
        },  # 3 shared neg, same split: ok
        {"pos": "The tea is great.", "neg": "The tea is bad.", "split": "test"},  # 4 pos leaks from 3
        {"pos": "The cake is bad.", "neg": "The pie is bad.", "split": "train"},  # 5 labelled both ways
        {"prompt": "Q?", "pos": "Yes.", "neg": "No.", "split": "val"},  # 6
        {"prompt": "q?", "pos": "yes.", "neg": "no.", "split": "test"},  # 7 duplicate of 6 across splits
        {"prompt": "Other?", "pos": "Yes.", "neg": "No.", "split": "test"},  # 8 different prompt: ok
    ]
    with pytest.raises(DatasetError) as info:
        load_dataset(_write(tmp_path, rows))
    by_line = {p.line: p.message for p in info.value.problems}
    assert sorted(by_line) == [2, 4, 5, 7]
    assert "duplicate of the row on line 1" in by_line[2]
    assert "repeats line 3" in by_line[4] and "across splits" in by_line[4]
    assert "neg side of line 1" in by_line[5] and "both ways" in by_line[5]
    assert "duplicate of the row on line 6 (split 'val')" in by_line[7]


def test_many_problems_are_shortened_but_all_kept(tmp_path):
    rows = [{"pos": f"Text {i}.", "neg": "", "split": "train"} for i in range(30)]
    with pytest.raises(DatasetError) as info:
        load_dataset(_write(tmp_path, rows))
    assert len(info.value.problems) == 30
    assert "... (10 more)" in str(info.value)
    assert str(info.value).count("is empty") == 20


def test_empty_file_and_bad_encoding(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no rows"):
        load_dataset(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b'\n{"pos": "caf\xe9", "neg": "x", "split": "train"}\n')
    with pytest.raises(DatasetError, match=re.escape(f"{latin}:2: not valid UTF-8")):
        load_dataset(latin)


def test_blank_lines_are_allowed_and_lines_counted(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(
        "\n"
        + json.dumps(GOOD)
        + "\n\n"
        + json.dumps({"pos": "Other.", "neg": "Else.", "split": "val"})
        + "\n"
    )
    ds = load_dataset(path)
    assert [p.line for p in ds.pairs] == [2, 4]


def test_line_separators_inside_strings_and_crlf_files(tmp_path):
    rows = [
        {"pos": f"Great{c}{s}", "neg": f"Bad{c}{s}", "split": s}
        for c, s in zip("\u2028\u2029\x85", SPLITS, strict=True)
    ]
    path = (
        tmp_path / "sep.jsonl"
    )  # json.dumps writes these characters raw; JSON Lines ends lines with \n only
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    ds = load_dataset(path)
    assert [(p.line, p.pos) for p in ds.pairs] == [(i + 1, r["pos"]) for i, r in enumerate(rows)]


def test_duplicates_are_found_across_unicode_forms(tmp_path):
    composed, decomposed = "Caf\u00e9 is nice.", "Cafe\u0301 is nice."
    rows = [
        {"pos": composed, "neg": "It is bad.", "split": "train"},
        {"pos": decomposed, "neg": "Awful.", "split": "test"},
    ]
    with pytest.raises(DatasetError, match=r":2: the pos side \(split 'test'\) repeats line 1"):
        load_dataset(_write(tmp_path, rows))


# ---------------------------------------------------------------------------------------- encoding

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def toy_tokenizer():
    """A byte-level BPE trained in milliseconds on the shipped texts, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for name in SHIPPED:
        for pair in load_dataset(name).pairs:
            corpus += [pair.pos, pair.neg, pair.prompt or ""]
    corpus += ["Question:\n\n\nAnswer.\n\n"] * 50  # so that runs of newlines get merged tokens
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tok.chat_template = CHATML
    return tok


def _real_ids(enc, i, mask=None):
    mask = enc.attention_mask[i].bool() if mask is None else mask[i]
    return enc.input_ids[i][mask].tolist()


EXAMPLES = [
    Example(prompt="What time does the library open?", response="At nine."),
    Example(
        prompt="Why is the sky blue?", response="Air scatters blue light more strongly.", system="Be formal."
    ),
    Example(prompt="Hi.", response=""),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_masks_select_exactly_prompt_and_response(toy_tokenizer, padding_side):
    tok = toy_tokenizer
    enc = encode_examples(tok, EXAMPLES, padding_side=padding_side)
    assert enc.input_ids.shape == enc.attention_mask.shape == enc.prompt_mask.shape == enc.response_mask.shape
    assert enc.input_ids.dtype == torch.long and enc.prompt_mask.dtype == torch.bool
    assert not bool((enc.prompt_mask & enc.response_mask).any())
    assert torch.equal(enc.prompt_mask | enc.response_mask, enc.attention_mask.bool())
    for i, ex in enumerate(EXAMPLES):
        messages = ([{"role": "system", "content": ex.system}] if ex.system else []) + [
            {"role": "user", "content": ex.prompt}
        ]
        prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert tok.decode(_real_ids(enc, i, enc.prompt_mask)) == prompt_text
        assert tok.decode(_real_ids(enc, i, enc.response_mask)) == ex.response
        expected = tok(prompt_text, add_special_tokens=False)["input_ids"]
        expected += tok(ex.response, add_special_tokens=False)["input_ids"] if ex.response else []
        assert _real_ids(enc, i) == expected
        n = len(expected)
        real = enc.attention_mask[i].nonzero().flatten().tolist()
        seq = enc.input_ids.shape[1]
        assert real == (list(range(n)) if padding_side == "right" else list(range(seq - n, seq)))
        assert set(enc.input_ids[i][~enc.attention_mask[i].bool()].tolist()) <= {tok.pad_token_id}
        assert enc.position_ids[i][enc.attention_mask[i].bool()].tolist() == list(range(n))
        last = int(enc.last_prompt_index[i])
        assert enc.prompt_mask[i, last] and not enc.prompt_mask[i, last + 1 :].any()


def test_left_and_right_padding_hold_the_same_rows(toy_tokenizer):
    right = encode_examples(toy_tokenizer, EXAMPLES, padding_side="right")
    left = encode_examples(toy_tokenizer, EXAMPLES, padding_side="left")
    assert left.padding_side == "left"
    for i in range(len(EXAMPLES)):
        for mask in ("attention_mask", "prompt_mask", "response_mask"):
            a, b = getattr(right, mask), getattr(left, mask)
            assert _real_ids(right, i, a.bool()) == _real_ids(left, i, b.bool())
    assert (left.last_prompt_index < left.input_ids.shape[1]).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_plain_texts_are_all_prompt(toy_tokenizer, padding_side):
    texts = ["The food was wonderful.", "Bad.", "The coffee here is rich and delicious."]
    enc = encode_examples(toy_tokenizer, texts, padding_side=padding_side)
    assert not enc.response_mask.any()
    assert torch.equal(enc.prompt_mask, enc.attention_mask.bool())
    for i, text in enumerate(texts):
        ids = toy_tokenizer(text)["input_ids"]
        assert _real_ids(enc, i) == ids
        assert toy_tokenizer.decode(_real_ids(enc, i)) == text
        last = int(enc.last_prompt_index[i])
        assert enc.input_ids[i, last] == ids[-1]
        assert last == (len(ids) - 1 if padding_side == "right" else enc.input_ids.shape[1] - 1)


def test_response_boundary_is_built_segment_by_segment(toy_tokenizer):
    # A response that starts with a newline: tokenized together with the prompt (which ends in "\n"),
    # the newlines merge into one token across the boundary; segment by segment they do not.
    tok = toy_tokenizer
    ex = Example(prompt="Say hi.", response="\n\nHello there.")
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tok(ex.response, add_special_tokens=False)["input_ids"]
    joint = tok(prompt_text + ex.response, add_special_tokens=False)["input_ids"]
    assert joint != prompt_ids + response_ids  # the precondition that makes this test meaningful
    assert joint[: len(prompt_ids)] != prompt_ids
    enc = encode_examples(tok, [ex])
    assert _real_ids(enc, 0) == prompt_ids + response_ids
    assert _real_ids(enc, 0, enc.response_mask) == response_ids
    assert tok.decode(_real_ids(enc, 0, enc.response_mask)) == ex.response


def test_pairs_encode_their_side(toy_tokenizer):
    ds = load_dataset("formality")
    pairs = list(ds.val[:4])
    pos = encode_examples(toy_tokenizer, pairs, side="pos")
    neg = encode_examples(toy_tokenizer, pairs, side="neg")
    for i, pair in enumerate(pairs):
        assert toy_tokenizer.decode(_real_ids(pos, i, pos.response_mask)) == pair.pos
        assert toy_tokenizer.decode(_real_ids(neg, i, neg.response_mask)) == pair.neg
    assert isinstance(pairs[0], Pair)


def test_end_of_turn_is_part_of_the_response(toy_tokenizer):
    tok = toy_tokenizer
    enc = encode_examples(tok, EXAMPLES, end_of_turn=True)
    assert _real_ids(enc, 0, enc.response_mask)[-1] == tok.eos_token_id
    assert tok.decode(_real_ids(enc, 0, enc.response_mask)) == "At nine.<|im_end|>"
    assert not enc.response_mask[2].any()  # no answer, no end of turn


def test_chat_false_uses_plain_prompt_text(toy_tokenizer):
    tok = toy_tokenizer
    enc = encode_examples(tok, EXAMPLES[:2], chat=False)
    assert tok.decode(_real_ids(enc, 0, enc.prompt_mask)) == "What time does the library open?\n"
    assert tok.decode(_real_ids(enc, 1, enc.prompt_mask)) == "Be formal.\n\nWhy is the sky blue?\n"
    assert tok.decode(_real_ids(enc, 1, enc.response_mask)) == EXAMPLES[1].response


def test_max_length_cuts_from_the_right_and_warns(toy_tokenizer):
    full = encode_examples(toy_tokenizer, EXAMPLES[:2])
    n_prompt = int(full.prompt_mask[0].sum())
    with pytest.warns(UserWarning, match="longer than max_length"):
        enc = encode_examples(toy_tokenizer, EXAMPLES[:2], max_length=n_prompt + 1)
    assert enc.input_ids.shape[1] == n_prompt + 1
    assert int(enc.prompt_mask[0].sum()) == n_prompt and int(enc.response_mask[0].sum()) == 1
    assert _real_ids(enc, 0) == _real_ids(full, 0)[: n_prompt + 1]


def test_encode_errors(toy_tokenizer):
    tok = toy_tokenizer
    with pytest.raises(ValueError, match="padding_side must be one of"):
        encode_examples(tok, ["a"], padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        encode_examples(tok, [])
    with pytest.raises(TypeError, match="wrap a single one in a list"):
        encode_examples(tok, "a text")
    with pytest.raises(TypeError, match=r"examples\[1\] must be a str"):
        encode_examples(tok, ["a", 3])
    with pytest.raises(ValueError, match=r"examples\[0\] is an empty string"):
        encode_examples(tok, [""])
    with pytest.raises(ValueError, match="max_length"):
        encode_examples(tok, ["a"], max_length=0)
    with pytest.raises(ValueError, match=r"chat=True .* examples\[1\] is a plain text"):  # was not templated
        encode_examples(tok, [EXAMPLES[0], "a"], chat=True)
    plain_tok = copy.deepcopy(tok)
    plain_tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_examples(plain_tok, EXAMPLES, chat=True)
    enc = encode_examples(plain_tok, EXAMPLES[:1])  # chat=None falls back to plain text
    assert plain_tok.decode(_real_ids(enc, 0, enc.prompt_mask)) == "What time does the library open?\n"


def test_encoding_to_and_model_inputs(toy_tokenizer):
    enc = encode_examples(toy_tokenizer, EXAMPLES, padding_side="left")
    moved = enc.to("cpu")
    assert set(moved.model_inputs()) == {"input_ids", "attention_mask", "position_ids"}
    right = encode_examples(toy_tokenizer, EXAMPLES)  # positions as each text alone: the model's own
    assert set(right.model_inputs()) == {"input_ids", "attention_mask"}
    assert len(moved) == len(EXAMPLES)
    assert torch.equal(moved.response_mask, enc.response_mask)


# ----------------------------------------------------------------------------------------- positions

ANSWERS = {"prompt": "Is it cold?", "pos": "Yes, it is cold.", "neg": "Maybe it is cold."}
SYSTEM_ONLY = {"prompt": "Describe your weekend.", "system_pos": "Be cheerful.", "system_neg": "Be gloomy."}
MIXED_ROWS = [  # file lines 1-8; rows without answers on lines 2, 5, 7, 8
    {**ANSWERS, "split": "train"},
    {**SYSTEM_ONLY, "split": "train"},
    {"prompt": "Is it far?", "pos": "It is far.", "neg": "It might be far.", "split": "val"},
    {"prompt": "Is it late?", "pos": "It is late.", "neg": "It may be late.", "split": "test"},
    {"pos": "A fine day.", "neg": "A dull day.", "split": "train"},
    "",
    {"prompt": "Plan a trip.", "system_pos": "Be cheerful.", "system_neg": "Be gloomy.", "split": "test"},
    {"prompt": "Name a colour.", "system_pos": "Be cheerful.", "system_neg": "Be gloomy.", "split": "val"},
]


@pytest.fixture(scope="module")
def watched_model():
    """A tiny model that records every forward pass in ``model.calls``."""
    model = make_tiny_model("llama")
    model.calls = 0

    def count(*_):
        model.calls += 1

    model.register_forward_pre_hook(count)
    return model


@pytest.mark.parametrize("position", [None, "response_mean"])
def test_mixed_file_at_response_mean_is_refused_up_front_by_file_line(
    tmp_path, toy_tokenizer, watched_model, position
):
    # The documented format lets a file mix rows with answers and rows without; 'response_mean' (the default
    # as soon as one row has answers) cannot read the latter. Refused before the model runs, by file line.
    path = _write(tmp_path, MIXED_ROWS)
    ds = load_dataset(path)
    assert default_position(ds) == "response_mean"
    how = (
        r"the default: default_position picks it because 3 rows have answers"
        if position is None
        else "as given"
    )
    with pytest.raises(ValueError) as err:
        extract_trait(watched_model, toy_tokenizer, ds, layers=[1], position=position, progress=False)
    message = str(err.value)
    assert f"position 'response_mean' ({how})" in message
    assert f"4 of 7 rows of dataset 'data' ({path}) have no answer" in message
    assert "(plain pairs and prompt-style rows with system prompts only): lines 2, 5, 7-8;" in message
    assert "Split the file" in message and "position='prompt_last'" in message
    assert watched_model.calls == 0


def test_response_mean_on_data_without_answers_names_every_row(tmp_path, toy_tokenizer, watched_model):
    path = _write(tmp_path, [{**SYSTEM_ONLY, "split": s} | {"prompt": f"Q{s}?"} for s in SPLITS])
    ds = load_dataset(path)
    assert default_position(ds) == "prompt_last"
    with pytest.raises(ValueError, match=r"3 of 3 rows .* lines 1-3; this dataset has no answers"):
        extract_trait(watched_model, toy_tokenizer, ds, layers=[1], position="response_mean", progress=False)
    with pytest.raises(ValueError, match="position must be one of"):
        extract_trait(watched_model, toy_tokenizer, ds, layers=[1], position="response", progress=False)
    assert watched_model.calls == 0


def test_prompt_positions_read_every_row_and_warn_about_answer_only_rows(tmp_path):
    ds = load_dataset(_write(tmp_path, MIXED_ROWS))
    rows = {p.line: p for p in ds.pairs}
    assert [line for line, p in rows.items() if p.has_answers] == [1, 3, 4]
    assert [line for line, p in rows.items() if not p.prompts_differ] == [1, 3, 4]
    for position in ("prompt_last", "prompt_mean"):
        with pytest.warns(UserWarning, match=rf"position '{position}' .* 3 of 7 rows .*: lines 1, 3-4;"):
            check_position(ds, position)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_position(ds, "all")
        # rows with answers and different system prompts are read at every rule
        both = {**ANSWERS, "system_pos": "Be formal.", "system_neg": "Be casual."}
        ds = load_dataset(
            _write(tmp_path, [both | {"split": s, "prompt": f"Q{s}?"} for s in SPLITS], "b.jsonl")
        )
        for position in ("prompt_last", "prompt_mean", "response_mean", "all"):
            check_position(ds, position)


def test_prompt_positions_refuse_data_whose_sides_all_share_the_prompt(
    tmp_path, toy_tokenizer, watched_model
):
    ds = load_dataset(_write(tmp_path, [{**ANSWERS, "split": s, "prompt": f"Q{s}?"} for s in SPLITS]))
    for position in ("prompt_last", "prompt_mean"):
        with pytest.raises(
            ValueError, match=rf"position '{position}' .* every row .* position='response_mean'"
        ):
            check_position(ds, position)
        with pytest.raises(ValueError, match="every row"):
            extract_trait(watched_model, toy_tokenizer, ds, layers=[1], position=position, progress=False)
    assert watched_model.calls == 0
    check_position(ds, "response_mean")


def test_extract_refuses_position_all_before_any_model_work(toy_tokenizer, watched_model):
    with pytest.raises(ValueError, match=r"one row per example, and position='all' gives one per token"):
        extract_trait(watched_model, toy_tokenizer, load_dataset("sentiment"), layers=[1], position="all")
    assert watched_model.calls == 0


def test_extract_refuses_a_split_too_small_before_any_model_work(tmp_path, toy_tokenizer, watched_model):
    def rows(*splits):
        return [{"pos": f"good {i}", "neg": f"bad {i}", "split": s} for i, s in enumerate(splits)]

    ds = load_dataset(_write(tmp_path, rows("train", "train", "val", "test", "test")))
    with pytest.raises(
        ValueError, match=r"has 1 'val' pair; every split is needed, with at least 2 pairs in 'val'"
    ):
        extract_trait(watched_model, toy_tokenizer, ds, layers=[1], progress=False)
    ds = load_dataset(_write(tmp_path, rows("train", "val", "val", "test", "test"), "b.jsonl"))
    with pytest.raises(
        ValueError, match=r"has 1 'train' pair; .* at least 2 pairs in 'train' \(for the methods"
    ):
        extract_trait(
            watched_model, toy_tokenizer, ds, layers=[1], methods=["mean_diff", "probe"], progress=False
        )
    assert watched_model.calls == 0


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_datasets_are_readable_at_their_default_position(name):
    ds = load_dataset(name)
    expected = "prompt_last" if SHIPPED[name][0] == "plain" else "response_mean"
    assert default_position(ds) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_position(ds, expected, default=True)


def test_extract_trait_on_a_peft_model_names_modules_as_in_the_model_inside(toy_tokenizer):
    """A vector extracted on a PEFT (LoRA) wrapper names model.layers.N, so it loads on the plain or merged
    model and on the wrapper alike."""
    import peft

    model = make_tiny_model("llama")
    model.resize_token_embeddings(len(toy_tokenizer))  # the toy tokenizer's 600 ids
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    data = load_dataset("sentiment")
    # a random model and a toy tokenizer carry no sentiment: the control says so
    with pytest.warns(UserWarning, match="does no better on validation .* than the best of 32 random"):
        result = extract_trait(
            wrapped, toy_tokenizer, data, layers=[1, 2], methods=["mean_diff"], progress=False
        )
    assert not result.control_ok
    assert result.module_paths == ["model.layers.1", "model.layers.2"]
    vector = result.trait_vector()  # a model built from a config has no name: its class names it
    assert vector.model == result.model_name == "LlamaForCausalLM"
    vector.check_model(model)
    assert vector.module_in(wrapped) == f"base_model.model.model.layers.{vector.layer}"
    with pytest.warns(UserWarning, match="does no better on validation"):
        plain = extract_trait(
            model, toy_tokenizer, data, layers=[1, 2], methods=["mean_diff"], progress=False
        )
    assert plain.module_paths == result.module_paths and torch.equal(
        plain.vectors["mean_diff"], result.vectors["mean_diff"]
    )


def test_an_extraction_records_the_dtype_the_model_computed_in(toy_tokenizer, tmp_path):
    """Vectors come out float32 whatever the model's dtype, so the file's "dtype" did not say it ran in bf16."""
    model = make_tiny_model("llama").to(torch.bfloat16)
    model.resize_token_embeddings(len(toy_tokenizer))
    with pytest.warns(UserWarning, match="does no better on validation"):  # a random model: no signal
        result = extract_trait(
            model, toy_tokenizer, load_dataset("sentiment"), layers=[1], methods=["mean_diff"], progress=False
        )
    result.save(tmp_path)
    vector = traitlens.load_vector(tmp_path / "trait_vector.safetensors")
    assert vector.dtype == torch.float32 and vector.extra["model_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "summary.json").read_text())["model_dtype"] == "bfloat16"


def test_rows_json_can_hold_but_no_text_can_are_named_by_line_and_any_path_object_is_a_path(tmp_path):
    import os

    good = {"pos": "good", "neg": "bad", "split": "train"}
    # half a surrogate pair failed later inside the tokenizer; deep nesting raised a bare RecursionError
    path = _write(tmp_path, [good, r'{"pos": "good\ud800", "neg": "bad", "split": "train"}', "[" * 100000])
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert "data.jsonl:2: field 'pos' holds '\\ud800', half of a surrogate pair" in str(err.value)
    assert "data.jsonl:3: invalid JSON (nested too deeply)" in str(err.value)

    class Where(os.PathLike):  # a path object that is not a pathlib.Path was refused
        def __fspath__(self):
            return str(tmp_path / "data.jsonl")

    _write(tmp_path, [{"pos": f"good {s}", "neg": f"bad {s}", "split": s} for s in ("train", "val", "test")])
    assert load_dataset(Where()).sizes == load_dataset(tmp_path / "data.jsonl").sizes


def test_an_example_of_no_tokens_is_named():
    from conftest import make_word_tokenizer

    tokenizer = make_word_tokenizer()  # splits on whitespace, and keeps none of it
    for examples in (["w1", "   "], [Example(prompt=" ")]):  # rows of shape (1, 0) reached the model
        with pytest.raises(ValueError, match=rf"examples\[{len(examples) - 1}\] is no tokens at all"):
            encode_examples(tokenizer, examples, chat=False)
