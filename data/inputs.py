"""Inputs of `tessera prepare`: which files, and the documents in each.

    *.txt (or any other name)       one document per file
    *.jsonl, *.jsonl.gz, *.jsonl.zst  one document per non-blank line, in the text field
    *.parquet                        one document per row, in the text column (null: none)

Each document keeps its index in its file (a blank line is not a document; an empty text or a
null is, and keeps its index), and how far into its file's bytes it ends (for the ETA).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tessera.data.format import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
DEFAULT_GLOBS = ("*.txt", "*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.parquet")
PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: Path
    source: str  # the path as the user gave it (or found under a given directory)

    @property
    def num_bytes(self) -> int:
        return self.path.stat().st_size


@dataclasses.dataclass(frozen=True)
class Document:
    source: str
    index: int  # document index within its file
    text: str
    file_index: int = 0  # the file's index in the input list
    end_byte: int = 0  # how far into the file (its bytes on disk) this document ends


def _nothing_matched(given: str, directory: Path, globs: Sequence[str]) -> str:
    """What the directory holds instead, and the option that takes it (a folder of .py or .md
    files is plain text to prepare)."""
    patterns = ", ".join(repr(g) for g in globs)
    seen = sorted(p for p in directory.rglob("*") if p.is_file())
    if not seen:
        return f"{given}: no files at all (looked for {patterns})"
    suffixes = sorted({p.suffix for p in seen if p.suffix})
    shown = ", ".join(str(p.relative_to(directory)) for p in seen[:3])
    more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
    hint = " ".join(f"--glob '*{s}'" for s in suffixes[:3]) or "--glob '*'"
    return (f"{given}: no input files matching {patterns}; it holds {shown}{more}: add "
            f"{hint} to read them as text (one document per file)")


def find_input_files(inputs: Sequence[str], globs: Sequence[str]) -> list[InputFile]:
    """Files given directly, plus files under given directories matching a glob (sorted)."""
    if not inputs:
        raise DataError("no inputs given")
    files: list[InputFile] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = _walk_directory(path, globs)
            if not found:
                raise DataError(_nothing_matched(given, path, globs))
            files.extend(found)
        elif path.is_file():
            files.append(InputFile(path=path, source=given))
        else:
            raise DataError(f"{given}: no such file or directory")
    return _unique(files)


def _walk_directory(directory: Path, globs: Sequence[str]) -> list[InputFile]:
    relative_paths = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in globs):
                relative_paths.append((Path(root) / name).relative_to(directory))
    relative_paths.sort(key=lambda p: p.parts)
    return [InputFile(path=directory / rel, source=str(directory / rel)) for rel in relative_paths]


def _unique(files: list[InputFile]) -> list[InputFile]:
    seen: set[Path] = set()
    unique = []
    for f in files:
        resolved = f.path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(f)
    return unique


def iter_documents(
    file: InputFile, text_field: str = "text", file_index: int = 0, start_doc: int = 0
) -> Iterator[Document]:
    """The file's documents from index `start_doc` on (earlier ones are passed over, not
    tokenized: the resume of an interrupted prepare)."""
    name = file.path.name
    if name.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(file, text_field, file_index, start_doc)
    elif name.endswith(PARQUET_SUFFIX):
        yield from _iter_parquet(file, text_field, file_index, start_doc)
    elif start_doc == 0:
        data = file.path.read_bytes()
        text = _decode_utf8(data, file.source, byte_offset=0)
        yield Document(file.source, 0, text, file_index, len(data))


def _open_lines(file: InputFile):
    """(binary line stream, raw file whose tell() is the position on disk)."""
    raw = open(file.path, "rb")  # noqa: SIM115 (closed by the caller)
    name = file.path.name
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    if name.endswith(".zst"):
        try:
            import zstandard  # lazy: only for .zst inputs
        except ImportError:
            raw.close()
            raise DataError(f"{file.source}: reading .zst needs the zstandard package") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard  # lazy: only for .zst inputs

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _iter_jsonl(
    file: InputFile, text_field: str, file_index: int, start_doc: int
) -> Iterator[Document]:
    index = 0
    byte_offset = 0  # in the decompressed text, for messages
    lines, raw = _open_lines(file)
    try:
        for line_number, raw_line in enumerate(lines, start=1):
            byte_offset += len(raw_line)
            if not raw_line.strip():
                continue
            if index < start_doc:
                index += 1
                continue
            line = _decode_utf8(raw_line, file.source, byte_offset - len(raw_line)).strip()
            where = f"{file.source}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{where}: no {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: {text_field!r} is {type(text).__name__}, not a string")
            yield Document(file.source, index, text, file_index, raw.tell())
            index += 1
    except _decompression_errors() as e:
        raise DataError(f"{file.source}: corrupt compressed data ({e})") from e
    finally:
        lines.close()
        raw.close()


def _iter_parquet(
    file: InputFile, text_field: str, file_index: int, start_doc: int
) -> Iterator[Document]:
    import pyarrow as pa  # lazy: only for parquet inputs
    import pyarrow.parquet as pq  # lazy: only for parquet inputs

    try:
        parquet = pq.ParquetFile(file.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file.source}: not a readable parquet file ({e})") from e
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        columns = ", ".join(schema.names)
        raise DataError(f"{file.source}: no column {text_field!r} (columns: {columns})")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{file.source}: column {text_field!r} is {column_type}, not a string")
    num_rows = max(1, parquet.metadata.num_rows)
    size = file.num_bytes
    index = 0
    try:
        for batch in parquet.iter_batches(columns=[text_field], batch_size=PARQUET_BATCH_ROWS):
            if index + batch.num_rows <= start_doc:
                index += batch.num_rows
                continue
            for text in batch.column(0).to_pylist():
                if index >= start_doc and text is not None:
                    yield Document(
                        file.source, index, text, file_index, size * (index + 1) // num_rows
                    )
                index += 1
    except pa.ArrowException as e:
        raise DataError(f"{file.source}: corrupt parquet data ({e})") from e


def _decode_utf8(data: bytes, source: str, byte_offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 at byte offset {byte_offset + e.start}") from e


def iter_all_documents(
    files: Sequence[InputFile], text_field: str, start: tuple[int, int] = (0, 0)
) -> Iterator[Document]:
    """Every document, from (file index, document index) `start` on."""
    start_file, start_doc = start
    for file_index in range(start_file, len(files)):
        first = start_doc if file_index == start_file else 0
        yield from iter_documents(files[file_index], text_field, file_index, first)


def total_bytes(files: Iterable[InputFile]) -> int:
    return sum(f.num_bytes for f in files)
