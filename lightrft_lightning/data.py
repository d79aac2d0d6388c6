"""Prompt data: rows from a file, a Hugging Face ``datasets`` directory or an in-code list, loaded by
:class:`PromptDataModule` through a :class:`~lightrft_lightning.sampler.ResumableSampler` (its position is saved
in the checkpoint, so a resumed run neither replays nor skips prompts), and :func:`render_prompts`, which turns
rows into the texts and token ids the rollout engine gets.

A row is ``{"prompt": str, ...}`` (raw text) or ``{"messages": [{"role": ..., "content": ...}, ...], ...}``
(a chat, rendered with the tokenizer's chat template); its other keys are metadata passed to reward
functions."""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from lightrft_lightning.sampler import ResumableSampler  # noqa: F401  (re-exported: importable from here too)

Row = dict[str, Any]

ROLES = ("system", "user", "assistant")
MESSAGES_ACCEPTED = ("a non-empty list of {'role': 'system'|'user'|'assistant', 'content': str} dicts whose last "
                     "message is not from the assistant")
#: file suffixes :meth:`PromptDataset.from_file` reads (a directory is read with ``datasets``)
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
OTHER_SOURCES = ("a JSON list of rows (.json), a Parquet file (.parquet), a CSV file (.csv) or a Hugging Face "
                 "datasets directory (written by save_to_disk, or a folder of .jsonl/.json/.parquet/.csv/.arrow "
                 "data files)")
ACCEPTED_SOURCES = f"a JSONL file (.jsonl, one object per line), {OTHER_SOURCES}"
_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # what save_to_disk writes
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, m)) for m in _SAVED_MARKERS)


def _has_data_files(path: str) -> bool:
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.endswith(_DATA_SUFFIXES) and not f.startswith(".") for f in files):
            return True
    return False


def check_prompt_file(path: str) -> None:
    """Raise unless ``path`` is a readable source: an existing file with one of :data:`SUFFIXES`, or a
    directory that ``datasets`` loads (a ``save_to_disk`` directory or a folder of data files)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not (_is_saved_dataset(path) or _has_data_files(path)):
            raise IsADirectoryError(f"prompt file {path!r} is a directory; accepted: {ACCEPTED_SOURCES} (this "
                                    f"directory has no {', '.join(_SAVED_MARKERS)} and no data files)")
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; accepted: {ACCEPTED_SOURCES}")
    suffix = os.path.splitext(path)[1]
    if suffix.lower() not in SUFFIXES:
        raise ValueError(f"prompt file {path!r} has suffix {suffix!r}, which is not read; accepted suffixes: "
                         f"{', '.join(SUFFIXES)} (or a Hugging Face datasets directory)")


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise ImportError(f"reading {what} needs the {package!r} package; accepted: install it "
                          f"(`pip install {package}`) or use a JSONL file") from err


def _check_messages(messages: Any, name: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{name}: field 'messages' is {type(messages).__name__} {messages!r:.60}; accepted: "
                         f"{MESSAGES_ACCEPTED}")
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{name}: field 'messages[{j}]' is {type(m).__name__} {m!r:.40}; accepted: a dict "
                             "{'role': 'system'|'user'|'assistant', 'content': str}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"{name}: field 'messages[{j}].role' is {role!r:.40}; accepted: one of "
                             f"{', '.join(repr(r) for r in ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{name}: field 'messages[{j}].content' is {type(content).__name__} {content!r:.40}; "
                             "accepted: a string")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{name}: field 'messages' ends with an assistant message; accepted: {MESSAGES_ACCEPTED} "
                         "(the model writes the assistant's reply)")
    return [dict(m) for m in messages]


def check_row(row: Union[str, Mapping[str, Any]], prompt_key: str = "prompt", name: str = "prompt row") -> Row:
    """Validate one row and return it as stored: ``{"prompt": str, ...}`` (from a string or the string under
    ``prompt_key``) or ``{"messages": [...], ...}``; other keys are kept as metadata. A row has exactly one
    of the two; a ``None`` value (how columnar files write an absent field) counts as absent. Errors name
    the row as ``name``."""
    if isinstance(row, str):
        return {"prompt": row}
    if not isinstance(row, Mapping):
        raise ValueError(f"{name} ({type(row).__name__} {row!r:.40}) is invalid; accepted: a string or a mapping "
                         f"with a string {prompt_key!r} or a 'messages' list")
    row = dict(row)
    keys = sorted(map(str, row))
    prompt = row.pop(prompt_key, None)
    messages = row.pop("messages", None) if prompt_key != "messages" else None
    if prompt_key == "messages" and prompt is not None and not isinstance(prompt, str):
        prompt, messages = None, prompt  # prompt_key="messages": a string there is a prompt, a list a chat
    if prompt is not None and messages is not None:
        raise ValueError(f"{name} has both {prompt_key!r} and 'messages'; accepted: exactly one of a string "
                         f"{prompt_key!r} or a 'messages' list")
    if messages is not None:
        row["messages"] = _check_messages(messages, name)
        return row
    if prompt is None:
        raise ValueError(f"{name} has no string field {prompt_key!r}; accepted: a string, or a mapping with a "
                         f"string {prompt_key!r} or a 'messages' field ({MESSAGES_ACCEPTED}) (got keys {keys})")
    if not isinstance(prompt, str):
        raise ValueError(f"{name} has no string field {prompt_key!r}: it is {type(prompt).__name__} "
                         f"{prompt!r:.40}; accepted: a string, or a 'messages' list instead ({MESSAGES_ACCEPTED})")
    row["prompt"] = prompt
    return row


class PromptDataset(Dataset):
    """Validated rows (see :func:`check_row`): ``{"prompt": str, ...}`` or ``{"messages": [...], ...}``;
    other keys are metadata passed to reward functions. ``names[i]`` is how errors name row ``i``
    (default ``"prompt row i"``). Build from a file or directory with :meth:`from_file`."""

    def __init__(self, rows: Sequence[Union[str, Row]], prompt_key: str = "prompt",
                 names: Optional[Sequence[str]] = None) -> None:
        self.rows: list[Row] = [check_row(row, prompt_key, names[i] if names is not None else f"prompt row {i}")
                                for i, row in enumerate(rows)]
        if not self.rows:
            raise ValueError("PromptDataset: no prompts; accepted: at least one row")

    @classmethod
    def from_file(cls, path: str, prompt_key: str = "prompt", split: str = "train") -> "PromptDataset":
        """Rows from ``path``, by its kind: ``.jsonl`` (:meth:`from_jsonl`), ``.json`` (:meth:`from_json`),
        ``.parquet`` (:meth:`from_parquet`), ``.csv`` or a directory (:meth:`from_hf_dataset`, reading
        ``split``). Anything else raises naming the accepted kinds."""
        path = os.fspath(path)
        check_prompt_file(path)
        if os.path.isdir(path):
            return cls.from_hf_dataset(path, split, prompt_key)
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".jsonl":
            return cls.from_jsonl(path, prompt_key)
        if suffix == ".json":
            return cls.from_json(path, prompt_key)
        if suffix == ".parquet":
            return cls.from_parquet(path, prompt_key)
        return cls.from_hf_dataset(path, split, prompt_key)  # .csv

    @classmethod
    def from_jsonl(cls, path: str, prompt_key: str = "prompt") -> "PromptDataset":
        """Rows from a JSONL file, one JSON object (or string) per line; blank lines are skipped. Errors
        name the line as ``path:N``."""
        check_prompt_file(path)
        rows, names = [], []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{n}: not UTF-8 text ({err.reason})") from err
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
                    names.append(f"{path}:{n}")
        if not rows:
            raise ValueError(f"prompt file {path!r} holds no prompts; accepted: a JSONL file, one object per line")
        return cls(rows, prompt_key, names)

    @classmethod
    def from_json(cls, path: str, prompt_key: str = "prompt") -> "PromptDataset":
        """Rows from a JSON file holding one list of rows. Errors name row ``i`` as ``path[i]``."""
        check_prompt_file(path)
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt file {path!r}: not UTF-8 text ({err.reason})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); accepted: a JSON list "
                             "of rows") from err
        if not isinstance(rows, list):
            raise ValueError(f"prompt file {path!r} holds a JSON {type(rows).__name__}; accepted: a JSON list of rows "
                             "(for one object per line, name the file .jsonl)")
        if not rows:
            raise ValueError(f"prompt file {path!r} holds no prompts; accepted: a non-empty JSON list of rows")
        return cls(rows, prompt_key, [f"{path}[{i}]" for i in range(len(rows))])

    @classmethod
    def from_parquet(cls, path: str, prompt_key: str = "prompt") -> "PromptDataset":
        """Rows from a Parquet file (read with ``pyarrow.parquet``), one per table row; a ``messages``
        column is a list of ``{role, content}`` structs. Errors name row ``i`` as ``path row i``."""
        check_prompt_file(path)
        pa = _require("pyarrow", f"the Parquet file {path!r}")
        pq = _require("pyarrow.parquet", f"the Parquet file {path!r}")
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ValueError(f"prompt file {path!r} cannot be read as Parquet ({type(err).__name__}: {err}); "
                             f"accepted: {ACCEPTED_SOURCES}") from err
        if not rows:
            raise ValueError(f"prompt file {path!r} holds no prompts; accepted: a Parquet file with at least one row")
        return cls(rows, prompt_key, [f"{path} row {i}" for i in range(len(rows))])

    @classmethod
    def from_hf_dataset(cls, path: str, split: str = "train", prompt_key: str = "prompt") -> "PromptDataset":
        """Rows from local data read with Hugging Face ``datasets`` (never the hub):

        - a directory written by ``Dataset.save_to_disk`` (its one split; ``split`` is not used) or
          ``DatasetDict.save_to_disk`` (its ``split``), read with ``datasets.load_from_disk``;
        - another directory: ``datasets.load_dataset(path, split=split)`` over its data files (splits
          come from the file names, e.g. ``train.jsonl`` / ``validation.jsonl``; otherwise all is ``train``);
        - a ``.csv`` file: ``datasets.load_dataset("csv", data_files={split: path}, split=split)``.

        Errors name row ``i`` as ``path (split) row i``."""
        path = os.fspath(path)
        check_prompt_file(path)
        ds = _require("datasets", f"{path!r}")
        if os.path.isdir(path) and _is_saved_dataset(path):
            try:
                data = ds.load_from_disk(path)
            except Exception as err:  # noqa: BLE001 - any failure to read is reported naming the directory
                raise ValueError(f"prompt directory {path!r} cannot be read by datasets.load_from_disk "
                                 f"({type(err).__name__}: {err}); accepted: a directory written by "
                                 "save_to_disk") from err
            if isinstance(data, ds.DatasetDict):
                if split not in data:
                    raise ValueError(f"prompt directory {path!r} has no split {split!r}; accepted: one of "
                                     f"{sorted(data)}")
                data = data[split]
                label = split
            else:
                label = None  # a saved Dataset: one split, whatever its name
            rows = data.to_list()
        else:
            kind = "directory" if os.path.isdir(path) else "file"
            # a private cache: nothing is left in ~/.cache, and ranks never wait on each other's locks
            with tempfile.TemporaryDirectory(prefix="lightrft-datasets-") as cache:
                try:
                    args = (path,) if kind == "directory" else ("csv",)
                    files = None if kind == "directory" else {split: path}
                    data = ds.load_dataset(*args, data_files=files, cache_dir=cache, keep_in_memory=True,
                                           download_config=ds.DownloadConfig(local_files_only=True, cache_dir=cache))
                except Exception as err:  # noqa: BLE001 - any failure to read is reported naming the source
                    raise ValueError(f"prompt {kind} {path!r} cannot be read by datasets.load_dataset "
                                     f"({type(err).__name__}: {err}); accepted: {ACCEPTED_SOURCES}") from err
                if split not in data:
                    raise ValueError(f"prompt {kind} {path!r} has no split {split!r}; accepted: one of {sorted(data)}")
                rows = data[split].to_list()
            label = split
        if not rows:
            raise ValueError(f"prompt source {path!r}{f' ({label})' if label else ''} holds no prompts; accepted: "
                             "at least one row")
        where = f"{path} ({label})" if label else path
        return cls(rows, prompt_key, [f"{where} row {i}" for i in range(len(rows))])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return {**self.rows[index], "index": index}


def _tokenizer_name(tokenizer: Any) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '')!r})"


def render_prompts(rows: Sequence[dict], tokenizer,
                   apply_chat_template: bool = False) -> tuple[list[str], list[list[int]]]:
    """The prompt texts and token ids the rollout engine gets for ``rows`` (:class:`PromptDataset` rows).

    A ``messages`` row is always rendered with ``tokenizer.apply_chat_template(messages,
    add_generation_prompt=True)``; a ``prompt`` row is rendered the same way as a single user message
    when ``apply_chat_template`` is true, else taken as it is. Texts are tokenized with
    ``add_special_tokens=False``, so the ids hold the special tokens exactly as the template writes them
    (the same ids as ``apply_chat_template(..., tokenize=True)``). The texts are what reward functions
    get as the prompt. A row that needs a chat template when the tokenizer has none raises ``ValueError``.
    """
    texts: list[str] = []
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, Mapping) else None
        if messages is None:
            prompt = row.get("prompt") if isinstance(row, Mapping) else None
            if not isinstance(prompt, str):
                raise ValueError(f"render_prompts: row {i} ({row!r:.60}) is invalid; accepted: a mapping with a string "
                                 "'prompt' or a 'messages' list (a PromptDataset row)")
            if not apply_chat_template:
                texts.append(prompt)
                continue
            messages = [{"role": "user", "content": prompt}]
        if not getattr(tokenizer, "chat_template", None):
            need = "a 'messages' row" if "messages" in row else "apply_chat_template=True"
            raise ValueError(f"tokenizer {_tokenizer_name(tokenizer)} has no chat template, but row {i} needs one "
                             f"({need}); accepted: a tokenizer with a chat_template (e.g. an instruct model's), "
                             "or string 'prompt' rows with apply_chat_template=False")
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return texts, ids


def collate_prompts(rows: list[Row]) -> dict[str, Any]:
    """``{"rows": [...], "index": LongTensor}``: the tensor lets Lightning infer the batch size."""
    return {"rows": rows, "index": torch.tensor([row["index"] for row in rows])}


class PromptDataModule(pl.LightningDataModule):
    """Prompts for RLHF from ``path`` (a file or directory) or ``prompts`` (a list of strings or rows).

    Args:
        path: a ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file or a Hugging Face ``datasets`` directory
            (see :meth:`PromptDataset.from_file`) of rows with a string ``prompt_key`` field or a
            ``messages`` chat (other fields are metadata).
        prompts: in-code prompts instead of ``path``.
        batch_size: prompts per training step on each rank.
        shuffle, seed: the per-epoch shuffle.
        prompt_key: the field holding a raw-text prompt.
        val_path, val_prompts: optional validation prompts (same formats).
        val_batch_size: validation prompts per batch (default ``batch_size``); generation is batched.
        split, val_split: the split of ``path`` / ``val_path`` read when it is a ``datasets`` directory
            with splits (or a ``.csv`` file); a ``Dataset.save_to_disk`` directory has one and ignores it.
    """

    def __init__(self, path: Optional[str] = None, prompts: Optional[list[Union[str, Row]]] = None,
                 batch_size: int = 8, shuffle: bool = True, seed: int = 0, prompt_key: str = "prompt",
                 val_path: Optional[str] = None, val_prompts: Optional[list[Union[str, Row]]] = None,
                 split: str = "train", val_split: str = "validation", val_batch_size: Optional[int] = None) -> None:
        super().__init__()
        if (path is None) == (prompts is None):
            raise ValueError("PromptDataModule: give exactly one of path= (a JSONL file) or prompts= (a list); "
                             f"path= may also be {OTHER_SOURCES}")
        if val_path is not None and val_prompts is not None:
            raise ValueError("PromptDataModule: give at most one of val_path= (a JSONL file) or val_prompts= (a list); "
                             f"val_path= may also be {OTHER_SOURCES}")
        for name, value in (("prompts", prompts), ("val_prompts", val_prompts)):
            if value is not None and (isinstance(value, str) or not isinstance(value, Sequence) or not value):
                raise ValueError(f"PromptDataModule.{name}={value!r:.80} is invalid; accepted: a non-empty list of "
                                 "strings or rows")
        for value in (path, val_path):
            if value is not None:
                check_prompt_file(value)
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None or name == "batch_size":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"PromptDataModule.{name}={value!r} is invalid; accepted: an integer >= 1")
        if not isinstance(prompt_key, str) or not prompt_key:
            raise ValueError(f"PromptDataModule.prompt_key={prompt_key!r} is invalid; accepted: a non-empty string")
        for name, value in (("split", split), ("val_split", val_split)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"PromptDataModule.{name}={value!r} is invalid; accepted: a non-empty string")
        self.path, self.prompts, self.batch_size = path, prompts, batch_size
        self.shuffle, self.seed, self.prompt_key = shuffle, seed, prompt_key
        self.val_path, self.val_prompts = val_path, val_prompts
        self.split, self.val_split = split, val_split
        self.val_batch_size = val_batch_size or batch_size
        self.dataset: Optional[PromptDataset] = None
        self.val_dataset: Optional[PromptDataset] = None
        self.sampler: Optional[ResumableSampler] = None
        self._pending_state: Optional[dict] = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = (PromptDataset.from_file(self.path, self.prompt_key, self.split) if self.path is not None
                            else PromptDataset(self.prompts, self.prompt_key))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        # data-parallel ranks: the strategy's (the ranks of a sequence-parallel group read the same prompts)
        split = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        if split:
            world, rank = split["num_replicas"], split["rank"]
        else:
            world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        self.sampler = ResumableSampler(self.dataset, self.batch_size, world, rank, self.shuffle, self.seed)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=collate_prompts)

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_path is None and self.val_prompts is None:
            return []
        if self.val_dataset is None:
            self.val_dataset = (PromptDataset.from_file(self.val_path, self.prompt_key, self.val_split)
                                if self.val_path is not None else PromptDataset(self.val_prompts, self.prompt_key))
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False, collate_fn=collate_prompts)

    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        trainer = self.trainer
        trained = None
        if trainer is not None and trainer.training:
            # batches of this epoch whose training_step has run (checkpoints are saved after it)
            trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"sampler": self.sampler.state_dict(trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            self._pending_state = state["sampler"]
            if self.sampler is not None:
                self.sampler.load_state_dict(self._pending_state)
                self._pending_state = None
