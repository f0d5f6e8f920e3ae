"""A Hugging Face dataset as users name it: a hub id or a local folder, with its config name, revision,
data files and split; only the named split is read.

`find_split` runs before Ray starts: it asks `datasets` which files make each split (no data is read),
so a split the dataset lacks is one line naming the splits it has. `load_split` then builds that split
alone: `datasets.load_dataset` with a `split` still prepares every split (a corrupt or huge test split
stops or slows a run that reads train), so it is given the named split's files only. A folder saved with
`save_to_disk` as a `DatasetDict` is opened at its split's subfolder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydpo.errors import RaydpoError, one_line

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class HfOptions:
    """How a dataset is named beyond its path: `datasets.load_dataset`'s `name`, `revision`, `data_files`."""

    config: str | None = None
    revision: str | None = None
    data_files: Any = None  # a file or pattern, a list of them (the train split), or a split -> files mapping

    def given(self) -> bool:
        return any(value is not None for value in (self.config, self.revision, self.data_files))


@dataclass(frozen=True)
class HfSplit:
    """One split of a Hugging Face dataset, resolved: a `save_to_disk` folder, or what `load_dataset`
    reads for it (the split's files only, where `datasets` lists them)."""

    source: str
    split: str
    saved: bool  # a save_to_disk folder (the split's own, for a DatasetDict)
    options: HfOptions = HfOptions()

    def load(self) -> datasets.Dataset:
        import datasets

        try:
            if self.saved:
                loaded = datasets.load_from_disk(self.source)
            else:
                options = self.options
                loaded = datasets.load_dataset(
                    self.source,
                    options.config,
                    data_files=options.data_files,
                    revision=options.revision,
                    split=self.split,
                )
        except Exception as error:  # datasets raises many kinds; all mean "could not open"
            raise RaydpoError(f"could not open dataset {self.source!r}: {one_line(error)}") from None
        return loaded.flatten_indices() if loaded._indices is not None else loaded  # a select/shuffle view


def find_split(source: str, split: str, options: HfOptions = HfOptions()) -> HfSplit:
    """The split SPLIT of the dataset SOURCE, checked to exist; reads no data."""
    saved = _saved_splits(source)
    if saved is not None:
        if options.given():
            raise RaydpoError(
                f"{source} was saved with save_to_disk: it has no config, revision or data files to choose"
            )
        if saved == [None]:  # one Dataset: it is the split
            return HfSplit(source, split, saved=True)
        _check_split(source, split, saved, options)
        return HfSplit(f"{source.rstrip('/')}/{split}", split, saved=True)
    if options.revision is not None and Path(source).expanduser().is_dir():
        raise RaydpoError(f"dataset_revision names a revision of a hub dataset; {source} is a local folder")
    builder = _builder(source, options)
    files = builder.config.data_files
    if files is None:  # not built from data files (none in datasets 4+): its info names the splits
        _check_split(source, split, list(builder.info.splits or {}), options)
        return HfSplit(source, split, saved=False, options=options)
    _check_split(source, split, list(files), options)
    only = HfOptions(options.config, options.revision, {split: list(files[split])})
    return HfSplit(source, split, saved=False, options=only)


def _builder(source: str, options: HfOptions) -> datasets.DatasetBuilder:
    import datasets

    try:
        return datasets.load_dataset_builder(
            source, options.config, data_files=options.data_files, revision=options.revision
        )
    except Exception as error:  # a missing config, file or repository: datasets says which
        raise RaydpoError(f"could not open dataset {source!r}: {one_line(error)}") from None


def _check_split(source: str, split: str, splits: list[str], options: HfOptions) -> None:
    if split not in splits:
        config = f" (config {options.config!r})" if options.config else ""
        raise RaydpoError(
            f"dataset {source!r}{config} has no split {split!r} (has: {', '.join(map(str, splits))})"
        )


def _saved_splits(source: str) -> list[str | None] | None:
    """The splits of a folder saved with `save_to_disk`: a DatasetDict's names, `[None]` for one Dataset,
    None if SOURCE was not saved so."""
    filesystem, path = _filesystem(source)
    if filesystem is None:
        return None
    import pyarrow.fs as pafs

    if filesystem.get_file_info(f"{path}/dataset_info.json").type == pafs.FileType.File:
        return [None]
    try:
        with filesystem.open_input_stream(f"{path}/dataset_dict.json") as stream:
            return list(json.loads(stream.read())["splits"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def is_hf_folder(filesystem, path: str) -> bool:
    """Whether the folder PATH is for `datasets`, not for raydpo's file reader: saved with `save_to_disk`, a
    dataset repository whose card lists its configs, or files named by split as the hub lays them out
    (`data/train-00000-of-00001.parquet`, `test.jsonl`), which read together would mix the splits."""
    import pyarrow.fs as pafs

    saved = ("dataset_info.json", "dataset_dict.json")
    if any(filesystem.get_file_info(f"{path}/{name}").type == pafs.FileType.File for name in saved):
        return True
    return _card_lists_configs(filesystem, path) or (
        isinstance(filesystem, pafs.LocalFileSystem) and _named_by_split(filesystem, path)
    )


def _card_lists_configs(filesystem, path: str) -> bool:
    import pyarrow.fs as pafs

    card = f"{path}/README.md"
    if filesystem.get_file_info(card).type != pafs.FileType.File:
        return False
    with filesystem.open_input_stream(card) as stream:
        head = stream.read(65536).decode("utf-8", "replace")
    front_matter = head.split("---")[1] if head.startswith("---") and head.count("---") >= 2 else ""
    return "configs:" in front_matter


def _named_by_split(filesystem, path: str) -> bool:
    """Whether `datasets` finds more than one split in a local folder by its file and folder names. Its
    patterns glob the folder once each, so they run only where the names, listed once, hold the keywords
    of two splits."""
    import pyarrow.fs as pafs
    from datasets.data_files import SPLIT_KEYWORDS, get_data_patterns

    listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    names = "\n".join(info.path[len(path) :].lower() for info in listed if info.type == pafs.FileType.File)
    named = [
        split
        for split, words in SPLIT_KEYWORDS.items()
        if re.search(rf"(^|[-._ 0-9/])({'|'.join(words)})([-._ 0-9/]|$)", names, re.MULTILINE)
    ]
    if len(named) < 2:
        return False
    try:
        return len(get_data_patterns(path)) > 1
    except Exception:  # no files it reads: not a layout of splits
        return False


def _filesystem(source: str):
    """(pyarrow filesystem, path) of a folder SOURCE, or (None, None) if it is no folder (a hub id)."""
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(source)
    except (ValueError, TypeError):  # a plain path
        filesystem, path = pafs.LocalFileSystem(), str(Path(source).resolve())
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return None, None
    return filesystem, path.rstrip("/")
