"""Turning rows into token ids for the two training tasks.

Causal-LM supervised fine-tuning (``task="sft"``), one of four row formats (``format="auto"`` picks the
first that fits the row's fields, in this order):

- ``messages``: a chat, rendered with the tokenizer's chat template; loss on the assistant turns only;
- ``alpaca``: ``instruction`` / ``input`` / ``output`` in the Stanford Alpaca prompt (Taori et al. 2023,
  github.com/tatsu-lab/stanford_alpaca); loss on the output only;
- ``prompt_completion``: ``prompt`` / ``completion``; loss on the completion only;
- ``text``: plain text; loss on every token.

Labels are the input ids with ``-100`` (PyTorch's ``ignore_index``) exactly on prompt tokens; the model
shifts them by one internally (Hugging Face convention). Prompt and completion are tokenized separately and
concatenated, so the masked span is exactly the prompt's tokens. An EOS ends the completion.

Sequence classification (``task="classification"``): ``text`` (+ optional ``text_pair``) and ``label``;
label names are mapped to ids in sorted order (numerically when every name is an integer).

Rows longer than ``max_length`` are truncated on the right and counted; an SFT row whose targets are all cut
off is dropped and counted (it would add no loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.models.generate import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from lorakit.models.tokenizer import adds_bos, has_chat_template
from lorakit.train.data import DataError, RawData, read_records, split_validation

IGNORE_INDEX = -100
TASKS = ("sft", "classification")
SFT_FORMATS = ("messages", "alpaca", "prompt_completion", "text")
_FORMAT_FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass
class EncodedDataset:
    """Tokenized examples of one split.

    ``examples[i]`` has ``input_ids`` (list[int]) and ``labels`` (list[int] for SFT, int for classification),
    and ``token_type_ids`` when the tokenizer gives them. ``full_lengths`` are the token lengths before
    truncation, ``label_names[id]`` the class names (classification). Indexing with a tuple of indices
    returns a list of examples (one packed row), so the dataset works with a DataLoader ``batch_sampler``
    that yields rows (``lorakit.train.collate``).
    """

    task: str
    format: str
    examples: list[dict[str, Any]]
    full_lengths: list[int]
    max_length: int
    label_names: list[str] | None = None
    n_truncated: int = 0
    n_dropped: int = 0
    source_rows: list[int] = field(default_factory=list)
    raw: RawData | None = field(
        default=None, repr=False
    )  # the rows this was encoded from (for the data check)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | tuple[int, ...] | list[int]) -> Any:
        if isinstance(index, (tuple, list)):
            return [self.examples[i] for i in index]
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Token lengths after truncation (what batching sees)."""
        return [len(ex["input_ids"]) for ex in self.examples]

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names or [])}


def detect_format(record: Mapping[str, Any], where: str = "") -> str:
    """The SFT format a row fits (``messages`` > ``alpaca`` > ``prompt_completion`` > ``text``)."""
    for fmt in SFT_FORMATS:
        if all(f in record for f in _FORMAT_FIELDS[fmt]):
            return fmt
    wanted = " or ".join("+".join(f) for f in _FORMAT_FIELDS.values())
    raise DataError(
        f"{where}: no SFT fields found (expected {wanted}); fields present: {sorted(record)}; "
        "map yours with fields=, e.g. text=sentence"
    )


def _text(record: Mapping[str, Any], name: str, where: str, optional: bool = False) -> str:
    if name not in record:
        if optional:
            return ""
        raise DataError(f"{where}: field {name!r} is missing; fields present: {sorted(record)}")
    value = record[name]
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return str(value)


def _enc(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def _prompt_completion_ids(tok: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    p = bos + _enc(tok, prompt)
    c = _enc(tok, completion) + eos
    return p + c, [IGNORE_INDEX] * len(p) + c


def _chat_ids(tok: Any, messages: Any, where: str) -> tuple[list[int], list[int]]:
    """Render a chat and mask everything but the assistant turns.

    The rendering is cut at the boundaries "conversation up to turn i (+ generation prompt)" and each
    piece is tokenized on its own, so the assistant spans are exact token ranges.
    """
    if not has_chat_template(tok):
        raise DataError(
            f"{where}: 'messages' rows need a tokenizer with a chat template; this one has none "
            "(use prompt/completion fields instead)"
        )
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {j} must have 'role' and 'content', got {m!r}")

    def render(msgs: list[Any], gen: bool) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    cuts: list[tuple[int, bool]] = []  # (text offset, the piece before it is a target)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            cuts.append((len(render(messages[:i], True)), False))
            cuts.append((len(render(messages[: i + 1], False)), True))
    full = render(messages, False)
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for end, target in [*cuts, (len(full), False)]:
        if end < pos:
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix; "
                "assistant-only masking needs that"
            )
        piece = _enc(tok, full[pos:end])
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
        pos = end
    if adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids, labels = [tok.bos_token_id, *ids], [IGNORE_INDEX, *labels]
    return ids, labels


def encode_sft(tok: Any, record: Mapping[str, Any], fmt: str, where: str = "") -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on prompt tokens) of one SFT row in format ``fmt``."""
    if fmt == "messages":
        if "messages" not in record:
            raise DataError(f"{where}: field 'messages' is missing; fields present: {sorted(record)}")
        return _chat_ids(tok, record["messages"], where)
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        inp = _text(record, "input", where, optional=True)
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=instruction, input=inp)
        return _prompt_completion_ids(tok, prompt, _text(record, "output", where))
    if fmt == "prompt_completion":
        return _prompt_completion_ids(tok, _text(record, "prompt", where), _text(record, "completion", where))
    if fmt == "text":
        ids, _ = _prompt_completion_ids(tok, "", _text(record, "text", where))
        return ids, list(ids)
    raise DataError(f"SFT format {fmt!r} is not supported; expected one of {['auto', *SFT_FORMATS]}")


def _label_key(name: str) -> tuple[int, Any]:
    try:
        return (0, int(name))
    except ValueError:
        return (1, name)


def label_names_of(raw: RawData) -> list[str]:
    """Sorted class names of a split (numeric order when every name is an integer)."""
    names = set()
    for i, rec in enumerate(raw.records):
        if "label" not in rec:
            raise DataError(f"{raw.where(i)}: field 'label' is missing; fields present: {sorted(rec)}")
        names.add(str(rec["label"]).strip())
    return sorted(names, key=_label_key)


def encode_records(
    raw: RawData,
    tokenizer: Any,
    task: str = "sft",
    max_length: int = 512,
    format: str = "auto",
    label_names: Sequence[str] | None = None,
) -> EncodedDataset:
    """Tokenize every row of ``raw`` for ``task``.

    Args:
        raw: rows from ``read_records``.
        tokenizer: an HF tokenizer or ``ByteTokenizer``.
        task: "sft" (causal-LM) or "classification".
        max_length: rows longer than this many tokens are truncated on the right (and counted).
        format: SFT row format, or "auto" (detected from the first row).
        label_names: the classes from the training split; a label outside them is an error. None: build
            the sorted set from ``raw`` (training split).
    """
    if task not in TASKS:
        raise DataError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
    if max_length < 2:
        raise DataError(f"max_length={max_length!r} must be at least 2")
    if not len(raw):
        raise DataError(f"{raw.path}: the dataset is empty (no rows)")
    examples: list[dict[str, Any]] = []
    full_lengths: list[int] = []
    source_rows: list[int] = []
    n_trunc = n_drop = 0
    if task == "classification":
        names = list(label_names) if label_names is not None else label_names_of(raw)
        index = {n: i for i, n in enumerate(names)}
        for i, rec in enumerate(raw.records):
            where = raw.where(i)
            text = _text(rec, "text", where)
            pair = _text(rec, "text_pair", where) if "text_pair" in rec else None
            if "label" not in rec:
                raise DataError(f"{where}: field 'label' is missing; fields present: {sorted(rec)}")
            label = str(rec["label"]).strip()
            if label not in index:
                raise DataError(
                    f"{where}: label {label!r} was not seen in training; training labels: {names}"
                )
            full = tokenizer(text, pair) if pair is not None else tokenizer(text)
            n = len(full["input_ids"])
            if n > max_length:
                n_trunc += 1
                full = tokenizer(text, pair, truncation=True, max_length=max_length)
            ex = {"input_ids": list(full["input_ids"]), "labels": index[label]}
            if full.get("token_type_ids") is not None:
                ex["token_type_ids"] = list(full["token_type_ids"])
            examples.append(ex)
            full_lengths.append(n)
            source_rows.append(i)
        return EncodedDataset(
            task, "classification", examples, full_lengths, max_length, names, n_trunc, 0, source_rows, raw
        )
    fmt = detect_format(raw.records[0], raw.where(0)) if format == "auto" else format
    if fmt not in SFT_FORMATS:
        raise DataError(f"SFT format {fmt!r} is not supported; expected one of {['auto', *SFT_FORMATS]}")
    for i, rec in enumerate(raw.records):
        ids, labels = encode_sft(tokenizer, rec, fmt, raw.where(i))
        full_lengths.append(len(ids))
        if len(ids) > max_length:
            n_trunc += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:
            n_drop += 1  # nothing left to learn from (all targets cut off, or no target at all)
            continue
        examples.append({"input_ids": ids, "labels": labels})
        source_rows.append(i)
    if not examples:
        raise DataError(f"{raw.path}: no row has a target token left within max_length={max_length}")
    return EncodedDataset(
        task, fmt, examples, full_lengths, max_length, None, n_trunc, n_drop, source_rows, raw
    )


def load_datasets(
    train_path: str,
    tokenizer: Any,
    task: str = "sft",
    *,
    fields: Mapping[str, str] | str | None = None,
    max_length: int = 512,
    format: str = "auto",
    val_path: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[EncodedDataset, EncodedDataset | None]:
    """Read and tokenize the training split and an optional validation file or held-out fraction.

    The validation split uses the training split's label names (an unseen label is an error) and format.
    """
    raw_train = read_records(train_path, fields)
    raw_val = read_records(val_path, fields) if val_path else None
    if raw_val is None and val_fraction > 0:
        raw_train, raw_val = split_validation(raw_train, val_fraction, seed)
    train = encode_records(raw_train, tokenizer, task, max_length, format)
    val = None
    if raw_val is not None:
        fmt = format if task == "classification" else train.format
        val = encode_records(raw_val, tokenizer, task, max_length, fmt, train.label_names)
    return train, val
