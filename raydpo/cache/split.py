"""Reading a finished split: the manifest validated, every listed part file present and whole.

Training and inspection read a precompute output only through here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydpo.cache.manifest import Manifest
from raydpo.cache.schema import MANIFEST, NONFINITE_METADATA, data_schema
from raydpo.cache.store import concurrently, join, location, resolve, split_state
from raydpo.errors import RaydpoError


@dataclass
class CacheSplit:
    """A finished, verified split of a precompute output: its location (a path or URI), its manifest and
    its data files (paths on `filesystem`)."""

    path: str
    manifest: Manifest
    files: list[str] = field(default_factory=list)
    filesystem: pafs.FileSystem | None = None
    # per data file, from its footer: its rows, and its count of rows with non-finite reference values
    # (`NONFINITE_METADATA`; None for a file whose footer has none)
    file_rows: list[int] = field(default_factory=list)
    nonfinite: list[dict[str, int] | None] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.manifest.counts.written

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(path, filesystem=self.filesystem, columns=columns) for path in self.files]
        return pa.concat_tables(tables) if tables else data_schema(False).empty_table()

    def to_ray_dataset(self):
        import ray.data

        return ray.data.read_parquet(self.files, filesystem=self.filesystem)

    def to_pandas(self, columns: list[str] | None = None):
        return self.read_table(columns).to_pandas()


def read_manifest(path: str) -> Manifest | None:
    """The validated manifest of the split at PATH, or None if it has none (missing or unfinished)."""
    fs, root = resolve(path)
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
            payload = stream.read()
    except FileNotFoundError:
        return None
    return Manifest.from_json(payload, location(path))


def open_split(path: str) -> CacheSplit:
    """Open a finished split and verify it against its manifest: every listed file present and whole."""
    fs, root = resolve(path)
    manifest = read_manifest(path)
    if manifest is None:
        state = split_state(path)
        what = (
            "an unfinished precompute output (no manifest)"
            if state == "partial"
            else "not a precompute output"
        )
        raise RaydpoError(f"{path} is {what}; run `raydpo precompute` to (re)build it")
    footers = dict(
        zip((entry.path for entry in manifest.files), _footers(fs, root, path, manifest), strict=True)
    )
    for entry in manifest.files:
        rows = footers[entry.path].num_rows
        if rows != entry.rows:
            raise RaydpoError(f"{path}: {entry.path} has {rows} rows, the manifest says {entry.rows}")
    nonfinite = [
        json.loads(counts) if (counts := (footers[name].metadata or {}).get(NONFINITE_METADATA)) else None
        for name in manifest.data_files
    ]
    files = [f"{root}/{name}" for name in manifest.data_files]
    return CacheSplit(
        path=location(path),
        manifest=manifest,
        files=files,
        filesystem=fs,
        file_rows=[footers[name].num_rows for name in manifest.data_files],
        nonfinite=nonfinite,
    )


def _footers(fs: pafs.FileSystem, root: str, path: str, manifest: Manifest) -> list[pq.FileMetaData]:
    """The footer of every file the manifest lists (read concurrently)."""

    def footer(name: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(f"{root}/{name}", filesystem=fs)
        except (OSError, pa.ArrowInvalid) as error:
            raise RaydpoError(f"{path}: {name} is missing or corrupt ({error}); recompute it") from None

    return concurrently(footer, [entry.path for entry in manifest.files])


def read_output(path: str, split: str | None = None) -> CacheSplit:
    """Open a finished precompute output for inspection or training: OUTPUT/<split> of OUTPUT (`split`
    default: train), or a split's own directory (which must be `split` where one is named); a path or URI."""
    fs, root = resolve(path)
    wanted = split or "train"
    if (
        fs.get_file_info(f"{root}/{MANIFEST}").type != pafs.FileType.File
        and fs.get_file_info(f"{root}/{wanted}").type == pafs.FileType.Directory
    ):
        path = join(path, wanted)
    opened = open_split(path)
    if split is not None and opened.manifest.split != split:
        raise RaydpoError(
            f"{path} is the {opened.manifest.split} split of a precompute output, not its {split} split; "
            f"pass the output (OUTPUT) or OUTPUT/{split}"
        )
    return opened
