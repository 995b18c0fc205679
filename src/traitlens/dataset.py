"""Contrastive datasets: JSONL files of positive/negative pairs, their validation, and their tokenization.

A dataset is one JSONL file, one pair per line, with the train / val / test split fixed in the file
(``"split"``). Two kinds of row (the format is documented in ``traitlens/data/FORMAT.md``):

- plain pairs ``{"pos": "...", "neg": "...", "split": "train"}``: two texts that differ in the trait;
- prompt-style pairs ``{"prompt": "user question", "pos": "answer", "neg": "answer", "split": "val"}``,
  optionally with ``"system_pos"`` / ``"system_neg"``; rendered with the tokenizer's chat template.

``load_dataset`` reads a shipped trait (``available_datasets()``) or a user file and reports every bad row
at once, by file and line, in a ``DatasetError``. ``check_position`` refuses, before any model work, a
position rule that some rows cannot be read at (``"response_mean"`` on rows without answers).
``encode_examples`` tokenizes one side of the pairs into ``input_ids`` with ``prompt_mask`` /
``response_mask`` built segment by segment, so that the boundary between prompt and response is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from traitlens._validation import check_choice, did_you_mean, short_list
from traitlens.positions import POSITION_RULES, last_token_index

SPLITS = ("train", "val", "test")
"""The split names, in file order of preference."""

_DATA_DIR = Path(__file__).parent / "data"
_TEXT_FIELDS = ("prompt", "pos", "neg", "system_pos", "system_neg")
_KNOWN_FIELDS = (*_TEXT_FIELDS, "split", "meta")
_MAX_PROBLEMS_SHOWN = 20


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Example:
    """One side of a prompt-style pair: a user ``prompt``, the assistant ``response`` and an optional system
    prompt. A plain text is passed to ``encode_examples`` as a ``str`` instead.

    ``response`` may be empty (prompt-only rows): the example then has prompt tokens only.
    """

    prompt: str
    response: str = ""
    system: str | None = None


@dataclass(frozen=True)
class Pair:
    """One validated row of a dataset file.

    Plain pairs have ``prompt=None`` and two texts ``pos`` / ``neg``. Prompt-style pairs have a ``prompt``
    and differing answers (``pos`` / ``neg``), differing system prompts (``system_pos`` / ``system_neg``),
    or both; an answer that is absent is ``None``.
    """

    pos: str | None
    neg: str | None
    split: str
    prompt: str | None = None
    system_pos: str | None = None
    system_neg: str | None = None
    line: int = 0
    meta: object = None

    @property
    def is_plain(self) -> bool:
        return self.prompt is None

    @property
    def has_answers(self) -> bool:
        """Whether the row has assistant answers, i.e. response tokens on both sides (prompt-style rows with
        ``pos`` / ``neg``). Plain pairs and rows with system prompts only have none."""
        return self.prompt is not None and self.pos is not None

    @property
    def prompts_differ(self) -> bool:
        """Whether the two sides differ before any answer: plain pairs (all text is prompt) and prompt-style
        rows with different system prompts. Where they do not, the prompt positions (``"prompt_last"``,
        ``"prompt_mean"``) read the same tokens on both sides."""
        return self.prompt is None or self.system_pos != self.system_neg

    @property
    def pos_example(self) -> str | Example:
        """The positive side: the text (plain pairs) or an ``Example`` (prompt-style pairs)."""
        return self._side(self.pos, self.system_pos)

    @property
    def neg_example(self) -> str | Example:
        """The negative side: the text (plain pairs) or an ``Example`` (prompt-style pairs)."""
        return self._side(self.neg, self.system_neg)

    def _side(self, answer: str | None, system: str | None) -> str | Example:
        if self.prompt is None:
            return answer or ""
        return Example(prompt=self.prompt, response=answer or "", system=system)


@dataclass(frozen=True)
class Problem:
    """One bad row: where it is and what is wrong with it."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class DatasetError(ValueError):
    """A dataset file has bad rows; ``problems`` lists every one of them (file, line, what is wrong)."""

    def __init__(self, path: Path, problems: Sequence[Problem]):
        self.path = path
        self.problems = list(problems)
        shown = [f"  {p}" for p in self.problems[:_MAX_PROBLEMS_SHOWN]]
        if len(self.problems) > _MAX_PROBLEMS_SHOWN:
            shown.append(f"  ... ({len(self.problems) - _MAX_PROBLEMS_SHOWN} more)")
        count = len(self.problems)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in dataset {path} (format: traitlens/data/FORMAT.md):\n"
            + "\n".join(shown)
        )


# ------------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class ContrastiveDataset:
    """The validated pairs of one JSONL file, in file order, with their fixed splits.

    ``sha256`` is the hash of the file's bytes: record it with vectors computed from the data.
    """

    name: str
    path: Path
    sha256: str
    pairs: tuple[Pair, ...] = field(repr=False)

    def split(self, split: str) -> tuple[Pair, ...]:
        """The pairs of one split (``"train"``, ``"val"`` or ``"test"``), in file order."""
        check_choice(split, "split", SPLITS)
        return tuple(p for p in self.pairs if p.split == split)

    @property
    def train(self) -> tuple[Pair, ...]:
        return self.split("train")

    @property
    def val(self) -> tuple[Pair, ...]:
        return self.split("val")

    @property
    def test(self) -> tuple[Pair, ...]:
        return self.split("test")

    @property
    def sizes(self) -> dict[str, int]:
        """Number of pairs per split: ``{"train": 84, "val": 18, "test": 18}``."""
        return {s: sum(p.split == s for p in self.pairs) for s in SPLITS}

    @property
    def kind(self) -> str:
        """``"plain"``, ``"prompt"`` or ``"mixed"``: which kinds of row the file holds."""
        kinds = {p.is_plain for p in self.pairs}
        return "mixed" if len(kinds) == 2 else ("plain" if True in kinds else "prompt")

    def examples(self, split: str | None = None) -> tuple[list[str | Example], list[str | Example]]:
        """``(positives, negatives)`` of one split (all pairs if ``None``), ready for ``encode_examples``."""
        pairs = self.pairs if split is None else self.split(split)
        return [p.pos_example for p in pairs], [p.neg_example for p in pairs]

    def __len__(self) -> int:
        return len(self.pairs)


def available_datasets() -> list[str]:
    """Names of the datasets shipped with traitlens (``"sentiment"``, ...), for ``load_dataset``."""
    return sorted(p.stem for p in _DATA_DIR.glob("*.jsonl"))


def load_dataset(name_or_path: str | Path) -> ContrastiveDataset:
    """Load and validate a shipped dataset by name, or a user JSONL file by path.

    Raises ``DatasetError`` (a ``ValueError``) listing every bad row by file and line; nothing is dropped.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a dataset name or a path, got {type(name_or_path).__name__}")
    shipped = available_datasets()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        path = _DATA_DIR / f"{name_or_path}.jsonl"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            hint = did_you_mean(str(name_or_path), shipped)
            raise FileNotFoundError(
                f"no dataset {str(name_or_path)!r}: not a shipped dataset ({short_list(shipped)}) "
                f"and not a file{hint}"
            )
    data = path.read_bytes()
    pairs = _parse(path, data)
    return ContrastiveDataset(name=path.stem, path=path, sha256=hashlib.sha256(data).hexdigest(), pairs=pairs)


def check_position(
    dataset: ContrastiveDataset, position: str, *, default: bool = False, vector: bool = False
) -> None:
    """Refuse, before any model work, a position rule that some rows of ``dataset`` cannot be read at.

    One rule reads every row of a dataset. ``"response_mean"`` needs answers (response tokens) in every row:
    plain pairs and prompt-style rows with system prompts only have none, so a ``ValueError`` names them by
    file line and says how to fix it (split the file, or pass another ``position``). ``"prompt_last"`` and
    ``"prompt_mean"`` read every row, but rows whose sides differ only in their answers read the same tokens
    on both sides there and carry no signal: a warning names them when they are only part of the data, a
    ``ValueError`` says so when they are all of it (an extraction or evaluation there would read identical
    activations and measure chance). ``"all"`` reads every row.
    ``default=True`` says in the message that the rule came from ``default_position``; ``vector=True`` that
    it is a saved vector's, to be scored on ``dataset`` (so the fix is other data, not another position).
    """
    check_choice(position, "position", POSITION_RULES)
    pairs = dataset.pairs
    where = f"dataset {dataset.name!r} ({dataset.path})"
    if position == "response_mean":
        unread = [p for p in pairs if not p.has_answers]
        if not unread:
            return
        how = (
            f"the default: default_position picks it because {len(pairs) - len(unread)} rows have answers"
            if default
            else ("the vector's" if vector else "as given")
        )
        kinds = []
        if any(p.is_plain for p in unread):
            kinds.append("plain pairs")
        if any(not p.is_plain for p in unread):
            kinds.append("prompt-style rows with system prompts only")
        if vector:
            fix = "a vector read at 'response_mean' can be scored on rows with answers only"
        elif len(unread) == len(pairs):
            fix = "this dataset has no answers: use position='prompt_last' (the default for such data)"
        else:
            fix = (
                "one rule reads every row, so rows with answers and rows without cannot be read together "
                "at 'response_mean'. Split the file into one with answers and one without and extract each, "
                "or pass position='prompt_last' explicitly (it reads every row, but rows whose sides differ "
                "only in their answers then read the same tokens on both sides and carry no signal)"
            )
        raise ValueError(
            f"position 'response_mean' ({how}) reads the mean over each row's answer, but {len(unread)} of "
            f"{len(pairs)} rows of {where} have no answer ({' and '.join(kinds)}): "
            f"lines {_line_ranges(p.line for p in unread)}; {fix}"
        )
    if position in ("prompt_last", "prompt_mean"):
        same = [p for p in pairs if not p.prompts_differ]
        if same and len(same) == len(pairs):
            fix = (
                "a vector read at a prompt position cannot be scored on this data"
                if vector
                else "use position='response_mean'"
            )
            raise ValueError(
                f"at position {position!r} the two sides of every row of {where} read the same tokens (they "
                f"differ only in their answers), so there is no signal to read there: {fix}"
            )
        if same:
            warnings.warn(
                f"at position {position!r} the two sides of {len(same)} of {len(pairs)} rows of {where} read "
                f"the same tokens (they differ only in their answers), so those rows carry no signal: lines "
                f"{_line_ranges(p.line for p in same)}; split the file, or read rows with answers at "
                "position='response_mean'",
                stacklevel=3,
            )


def _line_ranges(lines, limit: int = 10) -> str:
    """``'3-7, 9, 12-20'``: sorted line numbers as ranges, the first ``limit`` ranges shown."""
    ranges: list[list[int]] = []
    for line in sorted(lines):
        if ranges and line == ranges[-1][1] + 1:
            ranges[-1][1] = line
        else:
            ranges.append([line, line])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    if len(ranges) > limit:
        shown += f", ... ({sum(b - a + 1 for a, b in ranges[limit:])} more lines)"
    return shown


def _parse(path: Path, data: bytes) -> tuple[Pair, ...]:
    problems: list[Problem] = []
    pairs: list[Pair] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetError(path, [Problem(path, line, f"not valid UTF-8 ({err.reason})")]) from None
    text = text.removeprefix("\ufeff")  # the byte order mark some Windows editors write
    if text.lstrip().startswith("["):  # a JSON array would otherwise give an 'invalid JSON' for every line
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            message = (
                "the file is one JSON array, not JSON Lines: write each row as an object on a line of its own"
            )
            raise DatasetError(path, [Problem(path, 1, message)])
    # JSON Lines ends lines with "\n" only: str.splitlines would also break inside strings at U+2028,
    # U+2029, U+0085 and other characters that json.dumps(ensure_ascii=False) writes raw
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue  # blank lines are allowed (e.g. a trailing newline); they hold no row
        try:
            row = json.loads(raw, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            problems.append(Problem(path, number, f"invalid JSON ({err.msg} at column {err.colno})"))
            continue
        except ValueError as err:  # from _unique_keys
            problems.append(Problem(path, number, str(err)))
            continue
        except RecursionError:  # nested past Python's recursion limit
            problems.append(Problem(path, number, "invalid JSON (nested too deeply)"))
            continue
        pair, row_problems = _check_row(row, number)
        problems.extend(Problem(path, number, m) for m in row_problems)
        if pair is not None:
            pairs.append(pair)
    problems.extend(_duplicates(path, pairs))
    if not pairs and not problems:
        problems.append(Problem(path, 1, "the file holds no rows"))
    if problems:
        problems.sort(key=lambda p: p.line)
        raise DatasetError(path, problems)
    return tuple(pairs)


def _unique_keys(items: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict, refusing a key given twice (``json`` would keep the last value silently)."""
    row = dict(items)
    if len(row) < len(items):
        keys = [key for key, _ in items]
        twice = sorted({key for key in keys if keys.count(key) > 1})  # only on the way to an error
        raise ValueError(f"{short_list(twice)} given more than once in one object")
    return row


def _check_row(row: object, line: int) -> tuple[Pair | None, list[str]]:
    """A ``Pair`` (or ``None``) and the problems found in one decoded row."""
    if not isinstance(row, dict):
        return None, [f"a row must be a JSON object, got {type(row).__name__}"]
    problems = []
    for key in row:
        if key not in _KNOWN_FIELDS:
            problems.append(
                f"unknown field {key!r}{did_you_mean(key, _KNOWN_FIELDS)} (fields: {short_list(_KNOWN_FIELDS)})"
            )
    for key in _TEXT_FIELDS:
        value = row.get(key)
        if key in row and not isinstance(value, str):
            problems.append(f"field {key!r} must be a string, got {type(value).__name__}")
        elif isinstance(value, str) and not value.strip():
            problems.append(f"field {key!r} is empty")
        elif isinstance(value, str) and not value.isascii():
            try:  # JSON can spell half a surrogate pair (\ud800), which no tokenizer takes
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                problems.append(
                    f"field {key!r} holds {value[err.start]!r}, half of a surrogate pair: no text"
                )

    split = row.get("split")
    if "split" not in row:
        problems.append(f"missing field 'split' (one of {short_list(SPLITS)})")
    elif split not in SPLITS:
        hint = did_you_mean(split, SPLITS) if isinstance(split, str) else ""
        problems.append(f"unknown split {split!r}, expected one of {short_list(SPLITS)}{hint}")

    has = {key: key in row for key in _TEXT_FIELDS}
    if not has["prompt"]:
        for key in ("pos", "neg"):
            if not has[key]:
                problems.append(f"missing field {key!r} (a plain pair needs 'pos' and 'neg')")
        for key in ("system_pos", "system_neg"):
            if has[key]:
                problems.append(
                    f"field {key!r} needs a 'prompt' (system prompts belong to prompt-style pairs)"
                )
    else:
        answers = has["pos"] + has["neg"]
        systems = has["system_pos"] + has["system_neg"]
        if answers == 1:
            missing = "neg" if has["pos"] else "pos"
            problems.append(f"missing field {missing!r} (give both answers 'pos' and 'neg', or neither)")
        if systems == 1:
            missing = "system_neg" if has["system_pos"] else "system_pos"
            problems.append(f"missing field {missing!r} (give both system prompts or neither)")
        if answers == 0 and systems == 0:
            problems.append(
                "missing fields: a prompt-style pair needs answers 'pos' and 'neg' and/or system prompts "
                "'system_pos' and 'system_neg'"
            )
    if problems:
        return None, problems

    pair = Pair(
        pos=row.get("pos"),
        neg=row.get("neg"),
        split=split,
        prompt=row.get("prompt"),
        system_pos=row.get("system_pos"),
        system_neg=row.get("system_neg"),
        line=line,
        meta=row.get("meta"),
    )
    if _key(pair.pos_example) == _key(pair.neg_example):
        problems.append("the positive and the negative side are the same text")
        return None, problems
    return pair, problems


def _norm(text: str | None) -> str | None:
    """Unicode-normalised (NFKC: composed and decomposed accents alike), whitespace-collapsed, case-folded
    text: the identity used to find duplicates."""
    return None if text is None else " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def _key(side: str | Example) -> tuple:
    if isinstance(side, str):
        return ("text", _norm(side))
    return ("chat", _norm(side.system), _norm(side.prompt), _norm(side.response))


def _duplicates(path: Path, pairs: Sequence[Pair]) -> list[Problem]:
    """Rows that repeat another row, examples that leak across splits, and examples labelled both ways.

    Texts are compared after collapsing whitespace and case-folding. The same example may appear in two
    rows of one split (e.g. a shared negative answer), but not in two splits, and never as both pos and neg.
    """
    problems = []
    first_row: dict[tuple, Pair] = {}
    first_side: dict[tuple, tuple[str, Pair]] = {}
    for pair in pairs:
        row_key = (_key(pair.pos_example), _key(pair.neg_example))
        if row_key in first_row:
            other = first_row[row_key]
            problems.append(
                Problem(path, pair.line, f"duplicate of the row on line {other.line} (split {other.split!r})")
            )
            continue
        first_row[row_key] = pair
        for side, example in (("pos", pair.pos_example), ("neg", pair.neg_example)):
            key = _key(example)
            if key not in first_side:
                first_side[key] = (side, pair)
                continue
            other_side, other = first_side[key]
            if other_side != side:
                problems.append(
                    Problem(
                        path,
                        pair.line,
                        f"the {side} side is the {other_side} side of line {other.line}: "
                        "the same example is labelled both ways",
                    )
                )
            elif other.split != pair.split:
                problems.append(
                    Problem(
                        path,
                        pair.line,
                        f"the {side} side (split {pair.split!r}) repeats line {other.line} "
                        f"(split {other.split!r}): examples must not be shared across splits",
                    )
                )
    return problems


# ------------------------------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class Encoding:
    """A tokenized, padded batch with the prompt / response boundary of every row.

    All tensors are ``[batch, seq]`` on CPU. ``attention_mask`` (int64, 1 on real tokens) goes to the
    model, and so do ``position_ids`` (int64, counting real tokens only, so that left padding does not shift
    positions) when the batch is left-padded; ``prompt_mask`` and ``response_mask`` (bool) are disjoint and
    together cover exactly the real tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    padding_side: str

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` for ``model(**enc.model_inputs())``, and ``position_ids``
        when left-padded. Right-padded rows start where each text alone starts, so the model numbers their
        positions itself: not every model counts from 0 (RoBERTa-family models count from the pad id + 1)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.padding_side == "left":
            inputs["position_ids"] = self.position_ids
        return inputs

    @property
    def last_prompt_index(self) -> torch.Tensor:
        """``[batch]``: index of the last prompt token of each row (the last token of a plain text)."""
        return last_token_index(self.prompt_mask)

    def to(self, device: str | torch.device) -> Encoding:
        """A copy with every tensor on ``device``."""
        return Encoding(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            response_mask=self.response_mask.to(device),
            padding_side=self.padding_side,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_examples(
    tokenizer,
    examples: Sequence[str | Example | Pair],
    *,
    side: str = "pos",
    chat: bool | None = None,
    padding_side: str = "right",
    max_length: int | None = None,
    end_of_turn: bool = False,
) -> Encoding:
    """Tokenize examples into one padded batch with exact prompt and response masks.

    Args:
        tokenizer: a Hugging Face tokenizer.
        examples: plain texts (``str``), prompt-style ``Example``s, or ``Pair``s (their ``side``).
        side: ``"pos"`` or ``"neg"``: which side of ``Pair`` items to encode.
        chat: how prompt-style examples are rendered. ``None``: with the tokenizer's chat template when it
            has one, else as plain text; ``True``: with the chat template (an error if there is none);
            ``False``: as plain text ``"{system}\\n\\n{prompt}\\n"`` (system part only when given).
        padding_side: ``"right"`` or ``"left"`` (batched generation needs left).
        max_length: cut longer rows to this many tokens, from the right (a warning says how many).
        end_of_turn: append the tokenizer's EOS token (``<|im_end|>`` for ChatML models) after each
            non-empty response; it counts as a response token.

    The ids are built segment by segment: the prompt is tokenized alone (chat-templated with
    ``add_generation_prompt=True``, special tokens taken from the template), the response alone with
    ``add_special_tokens=False``, and the two id lists are concatenated. So the response starts exactly
    at its first token, even where tokenizing prompt + response in one go would merge tokens across the
    boundary. A plain text is all prompt (tokenized with the tokenizer's own special tokens, e.g. BOS)
    and has no response: its ``last_prompt_index`` is its last token.
    """
    check_choice(padding_side, "padding_side", ("right", "left"))
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    rows = list(tokenize_examples(tokenizer, examples, side=side, chat=chat, end_of_turn=end_of_turn))
    if max_length is not None:
        cut = sum(len(p) + len(r) > max_length for p, r in rows)
        if cut:
            warnings.warn(
                f"{cut} of {len(rows)} examples are longer than max_length={max_length} tokens and were cut "
                "from the right (their responses lose their end first)",
                stacklevel=2,
            )
        rows = [(p[:max_length], r[: max(0, max_length - len(p))]) for p, r in rows]
    return pad_rows(tokenizer, rows, padding_side=padding_side)


def tokenize_examples(
    tokenizer,
    examples: Sequence[str | Example | Pair],
    *,
    side: str = "pos",
    chat: bool | None = None,
    end_of_turn: bool = False,
) -> Iterator[tuple[list[int], list[int]]]:
    """The ids of each example as ``encode_examples`` builds them, unpadded: ``(prompt ids, response ids)``,
    one example at a time (the arguments are those of ``encode_examples``, checked before the first). With
    ``pad_rows`` it is ``encode_examples`` in two steps, for callers that tokenize examples once and batch
    them in another order (the pipeline batches them by length)."""
    check_choice(side, "side", ("pos", "neg"))
    if isinstance(examples, (str, Example, Pair)):
        raise TypeError("examples must be a sequence of examples; wrap a single one in a list")
    if len(examples) == 0:
        raise ValueError("examples is empty; give at least one text or Example")
    use_template = _use_chat_template(tokenizer, chat)
    if chat is True:  # asked for explicitly: a plain text, which is never templated, would ignore it silently
        plain = next((i for i, item in enumerate(examples) if isinstance(item, str)), None)
        if plain is not None:
            raise ValueError(
                f"chat=True renders prompt-style examples with the chat template, but examples[{plain}] is a "
                "plain text, which is tokenized as it is; to have it answered as a user message, pass "
                "Example(prompt=text), or leave chat unset for plain texts"
            )
    eos = getattr(tokenizer, "eos_token_id", None)
    if end_of_turn and eos is None:
        raise ValueError("end_of_turn=True needs a tokenizer with an eos_token_id")
    return _token_rows(tokenizer, examples, side, use_template, eos if end_of_turn else None)


def _token_rows(tokenizer, examples, side: str, use_template: bool, eos: int | None):
    for i, item in enumerate(examples):
        if isinstance(item, Pair):
            item = item.pos_example if side == "pos" else item.neg_example
        if isinstance(item, str):
            if not item:
                raise ValueError(f"examples[{i}] is an empty string")
            prompt_ids, response_ids = _ids(tokenizer, item, special=True), []
        elif isinstance(item, Example):
            prompt_ids = _prompt_ids(tokenizer, item, use_template, i)
            response_ids = _ids(tokenizer, item.response, special=False) if item.response else []
            if eos is not None and response_ids:
                response_ids.append(eos)
        else:
            raise TypeError(f"examples[{i}] must be a str, an Example or a Pair, got {type(item).__name__}")
        if not prompt_ids and not response_ids:  # e.g. whitespace, which some tokenizers drop
            raise ValueError(f"examples[{i}] is no tokens at all for this tokenizer: {item!r}")
        yield prompt_ids, response_ids


def pad_rows(
    tokenizer, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, padding_side: str = "right"
) -> Encoding:
    """One padded batch (``Encoding``) of ``(prompt ids, response ids)`` rows from ``tokenize_examples``
    (lists, or any sequences of ints that ``+`` joins, such as ``array``s), padded with the tokenizer's pad
    id (its EOS id when it has none)."""
    check_choice(padding_side, "padding_side", ("right", "left"))
    if len(rows) == 0:
        raise ValueError("rows is empty; give at least one (prompt ids, response ids) row")
    pad_id = _pad_id(tokenizer)
    batch = len(rows)
    seq = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((batch, seq), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, seq), dtype=torch.long)
    prompt_mask = torch.zeros((batch, seq), dtype=torch.bool)
    response_mask = torch.zeros((batch, seq), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        start = 0 if padding_side == "right" else seq - n
        input_ids[i, start : start + n] = torch.tensor(prompt + response, dtype=torch.long)
        attention[i, start : start + n] = 1
        prompt_mask[i, start : start + n_prompt] = True
        response_mask[i, start + n_prompt : start + n] = True
    position_ids = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    return Encoding(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        prompt_mask=prompt_mask,
        response_mask=response_mask,
        padding_side=padding_side,
    )


def _use_chat_template(tokenizer, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return has_template
    if not isinstance(chat, bool):
        raise TypeError(f"chat must be True, False or None, got {type(chat).__name__}")
    if chat and not has_template:
        raise ValueError(
            f"chat=True but the tokenizer {type(tokenizer).__name__} has no chat template; "
            "use chat=False to render prompts as plain text"
        )
    return chat


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _prompt_ids(tokenizer, example: Example, use_template: bool, index: int) -> list[int]:
    if not use_template:
        text = f"{example.system}\n\n{example.prompt}\n" if example.system else f"{example.prompt}\n"
        return _ids(tokenizer, text, special=True)
    messages = [{"role": "user", "content": example.prompt}]
    if example.system is not None:
        messages.insert(0, {"role": "system", "content": example.system})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # template errors (e.g. no system role) come from jinja, with varied types
        raise ValueError(
            f"the chat template of {type(tokenizer).__name__} failed on examples[{index}] "
            f"({type(err).__name__}: {err}); use chat=False to render prompts as plain text"
        ) from err
    # The rendered template already holds its special tokens (BOS, role markers) as text.
    return _ids(tokenizer, text, special=False)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # padded positions are masked out, so any id will do
