"""`tessera prepare`: tokenize text / JSON-lines files into WebDataset shards plus a manifest.

The layout is described in `tessera.data.format`. Output is deterministic: the same inputs and
tokenizer give byte-identical shards and manifest whatever the number of workers.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tessera.data.format import (
    MANIFEST_NAME,
    META_EXT,
    TOKENS_EXT,
    DataError,
    Manifest,
    ShardInfo,
    encode_tokens,
    token_dtype,
    write_manifest,
)
from tessera.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    train_bpe,
)

DEFAULT_SHARD_BYTES = 64 * 2**20
DEFAULT_GLOBS = ("*.txt", "*.jsonl")
SHARD_NAME = "shard-%06d.tar"
SAMPLE_KEY = "%09d"
TMP_SUFFIX = ".tmp"
JSONL_SUFFIX = ".jsonl"
# One tokenization task: up to this much text or this many documents.
BATCH_TEXT_CHARS = 4 * 2**20
BATCH_MAX_DOCS = 1024

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: Path
    source: str  # the path as the user gave it (or found under a given directory)


@dataclasses.dataclass(frozen=True)
class Document:
    source: str
    index: int  # document index within its file
    text: str


# ---------------------------------------------------------------------------------------------
# Inputs


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
                patterns = ", ".join(repr(g) for g in globs)
                raise DataError(f"{given}: no input files matching {patterns}")
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


def iter_documents(file: InputFile, text_field: str = "text") -> Iterator[Document]:
    """A .jsonl file holds one document per non-blank line; any other file is one document."""
    if file.path.name.endswith(JSONL_SUFFIX):
        yield from _iter_jsonl_documents(file, text_field)
    else:
        data = file.path.read_bytes()
        yield Document(file.source, 0, _decode_utf8(data, file.source, byte_offset=0))


def _iter_jsonl_documents(file: InputFile, text_field: str) -> Iterator[Document]:
    index = 0
    byte_offset = 0
    with open(file.path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            line = _decode_utf8(raw_line, file.source, byte_offset).strip()
            byte_offset += len(raw_line)
            if not line:
                continue
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
            yield Document(file.source, index, text)
            index += 1


def _decode_utf8(data: bytes, source: str, byte_offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 at byte offset {byte_offset + e.start}") from e


def iter_all_documents(files: Iterable[InputFile], text_field: str) -> Iterator[Document]:
    for file in files:
        yield from iter_documents(file, text_field)


# ---------------------------------------------------------------------------------------------
# Tokenization (in this process, or in a pool of worker processes)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], dtype: str) -> list[np.ndarray]:
    """Each text's ids with EOS appended, as `dtype`; an empty array for a text with no tokens."""
    if isinstance(tokenizer, ByteTokenizer):
        # Fast path: the UTF-8 bytes are the ids.
        id_arrays = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    else:
        id_arrays = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    out = []
    for ids in id_arrays:
        if ids.size == 0:
            out.append(np.zeros(0, dtype=dtype))
            continue
        if int(ids.max()) >= tokenizer.vocab_size:
            raise DataError(f"tokenizer produced id {int(ids.max())} >= its vocab size")
        tokens = np.empty(ids.size + 1, dtype=dtype)
        tokens[:-1] = ids
        tokens[-1] = tokenizer.eos_id
        out.append(tokens)
    return out


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= BATCH_TEXT_CHARS or len(batch) >= BATCH_MAX_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: str = ""


def _init_worker(serialized_tokenizer: str | None, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Parallelism comes from the processes; keep each one's Rust thread pool to itself.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if serialized_tokenizer is None:
        _worker_tokenizer = ByteTokenizer()
    else:
        _worker_tokenizer = HFTokenizer.from_str(serialized_tokenizer)
    _worker_dtype = dtype


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return encode_documents(_worker_tokenizer, texts, _worker_dtype)


def tokenize(
    documents: Iterable[Document], tokenizer: Tokenizer, dtype: str, workers: int
) -> Iterator[tuple[Document, np.ndarray]]:
    """(document, tokens) in document order, tokenized by `workers` processes."""
    if workers <= 1:
        for batch in _batches(documents):
            yield from zip(batch, encode_documents(tokenizer, [d.text for d in batch], dtype))
        return
    serialized = tokenizer.to_str() if isinstance(tokenizer, HFTokenizer) else None
    context = multiprocessing.get_context("spawn")  # no fork after tokenizers' threads start
    with context.Pool(workers, initializer=_init_worker, initargs=(serialized, dtype)) as pool:
        # A bounded window of tasks keeps memory flat; results are taken in submission order.
        pending: collections.deque = collections.deque()
        for batch in _batches(documents):
            pending.append((batch, pool.apply_async(_encode_in_worker, ([d.text for d in batch],))))
            if len(pending) >= 2 * workers:
                done_batch, result = pending.popleft()
                yield from zip(done_batch, result.get())
        while pending:
            done_batch, result = pending.popleft()
            yield from zip(done_batch, result.get())


# ---------------------------------------------------------------------------------------------
# Shards


class ShardWriter:
    """Writes samples into shard-XXXXXX.tar files of about `shard_bytes` of token payload.

    Each shard is written as a .tmp file and renamed once closed, so a .tar file is complete.
    """

    def __init__(self, directory: Path, dtype: str, shard_bytes: int, log: Log) -> None:
        self.directory = directory
        self.dtype = dtype
        self.shard_bytes = shard_bytes
        self.log = log
        self.shards: list[ShardInfo] = []
        self._file = None
        self._tar = None
        self._tmp_path: Path | None = None
        self._num_tokens = 0
        self._num_samples = 0
        self._payload_bytes = 0

    def add(self, tokens: np.ndarray, source: str, doc_index: int) -> None:
        if self._tar is None:
            self._open()
        payload = encode_tokens(tokens, self.dtype)
        meta = json.dumps({"source": source, "doc": doc_index}, sort_keys=True).encode("utf-8")
        self._tar.write(
            {"__key__": SAMPLE_KEY % self._num_samples, TOKENS_EXT: payload, META_EXT: meta}
        )
        self._num_samples += 1
        self._num_tokens += int(tokens.size)
        self._payload_bytes += len(payload)
        if self._payload_bytes >= self.shard_bytes:
            self._close_current()

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_current()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error)."""
        if self._tar is not None:
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = self._file = None

    def _open(self) -> None:
        import webdataset

        self._tmp_path = self.directory / (SHARD_NAME % len(self.shards) + TMP_SUFFIX)
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 (open until the shard is full)
        # encoder=False: values are bytes already; mtime=0 makes the tar reproducible.
        self._tar = webdataset.TarWriter(self._file, encoder=False, mtime=0)
        self._num_tokens = self._num_samples = self._payload_bytes = 0

    def _close_current(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        final_path = self._tmp_path.with_name(self._tmp_path.name.removesuffix(TMP_SUFFIX))
        os.replace(self._tmp_path, final_path)
        with open(final_path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        self.shards.append(
            ShardInfo(
                path=final_path.name,
                num_tokens=self._num_tokens,
                num_samples=self._num_samples,
                sha256=sha256,
            )
        )
        self.log(
            f"wrote {final_path.name}: {self._num_samples} documents, {self._num_tokens} tokens"
        )


# ---------------------------------------------------------------------------------------------
# The whole pipeline


def prepare(
    inputs: Sequence[str],
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    train_tokenizer_vocab: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    glob: str | Sequence[str] = DEFAULT_GLOBS,
    text_field: str = "text",
    workers: int = 1,
    log: Log = print,
) -> Manifest:
    """Tokenize INPUTS into shards in OUTPUT and write its manifest (last). See the module doc.

    `tokenizer` is a tokenizer.json path; `train_tokenizer_vocab` trains a byte-level BPE of
    that vocab size on the inputs first; neither means the built-in byte tokenizer.
    """
    start = time.perf_counter()
    globs = (glob,) if isinstance(glob, str) else tuple(glob)
    _check_options(tokenizer, train_tokenizer_vocab, shard_bytes, workers)
    output_dir = Path(output)
    _check_output(output_dir)
    files = find_input_files(inputs, globs)
    loaded: Tokenizer | None = HFTokenizer.from_file(tokenizer) if tokenizer is not None else None
    if loaded is not None:
        log(f"using tokenizer {tokenizer} (vocab size {loaded.vocab_size})")
    _make_output_dir(output_dir)

    if train_tokenizer_vocab is not None:
        log(f"training a byte-level BPE tokenizer (vocab {train_tokenizer_vocab})")
        texts = (doc.text for doc in iter_all_documents(files, text_field))
        loaded = train_bpe(texts, train_tokenizer_vocab)
        log(f"trained tokenizer: vocab size {loaded.vocab_size}")
    tok: Tokenizer = loaded if loaded is not None else ByteTokenizer()
    dtype = token_dtype(tok.vocab_size)

    writer = ShardWriter(output_dir, dtype, shard_bytes, log)
    try:
        documents = iter_all_documents(files, text_field)
        for doc, tokens in tokenize(documents, tok, dtype, workers):
            if tokens.size:
                writer.add(tokens, doc.source, doc.index)
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if not shards:
        raise DataError(f"{', '.join(inputs)}: empty input (no documents with any tokens)")

    if isinstance(tok, HFTokenizer):
        tok.save(output_dir)
    manifest = Manifest(tokenizer=tok.info(), dtype=dtype, shards=tuple(shards))
    write_manifest(output_dir, manifest)
    _log_summary(log, manifest, output_dir, time.perf_counter() - start)
    return manifest


def _check_options(
    tokenizer: str | os.PathLike | None,
    train_tokenizer_vocab: int | None,
    shard_bytes: int,
    workers: int,
) -> None:
    if tokenizer is not None and train_tokenizer_vocab is not None:
        raise DataError("give either a tokenizer path or a vocab size to train one, not both")
    if shard_bytes <= 0:
        raise DataError(f"shard size must be positive, got {shard_bytes} bytes")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")


def _check_output(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: --output exists and is not a directory")
    if (output_dir / MANIFEST_NAME).exists():
        raise DataError(f"{output_dir}: already prepared; remove it or choose another --output")


def _make_output_dir(output_dir: Path) -> None:
    """Create OUTPUT; drop temp files and shards of an earlier run that never finished."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("*" + TMP_SUFFIX):
        stale.unlink()
    for stale in output_dir.glob("shard-*.tar"):
        stale.unlink()


def _log_summary(log: Log, manifest: Manifest, output_dir: Path, seconds: float) -> None:
    seconds = max(seconds, 1e-9)
    log(
        f"prepared {manifest.num_samples} documents, {manifest.num_tokens} tokens in "
        f"{len(manifest.shards)} shards to {output_dir} in {seconds:.1f} s "
        f"({manifest.num_samples / seconds:.0f} documents/s, "
        f"{manifest.num_tokens / seconds:.0f} tokens/s)"
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _byte_size(text: str) -> int:
    """An int number of bytes, optionally with a K/M/G (binary) suffix: 67108864, 64M, 64MiB."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    multiplier = 1
    if value and value[-1] in units:
        multiplier = units[value[-1]]
        value = value[:-1]
    try:
        size = int(value) * multiplier
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera prepare",
        description="Tokenize text (.txt: one document per file) and JSON lines (.jsonl: one "
        "document per line) into WebDataset shards plus a manifest.",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="files, or directories to search recursively"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", metavar="PATH", help="a Hugging Face tokenizer.json")
    tokenizer.add_argument(
        "--train-tokenizer",
        type=_positive_int,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this vocab size on the inputs first "
        "(default without either: the built-in byte tokenizer)",
    )
    parser.add_argument(
        "--shard-bytes",
        type=_byte_size,
        default=DEFAULT_SHARD_BYTES,
        metavar="N",
        help="token payload per shard in bytes; K/M/G suffixes allowed (default: 64M)",
    )
    parser.add_argument(
        "--glob",
        action="append",
        metavar="PATTERN",
        help="file name pattern for files under directories; repeatable "
        f"(default: {' '.join(DEFAULT_GLOBS)})",
    )
    parser.add_argument("--text-field", default="text", help="the document field of .jsonl records")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="tokenizer processes (default: 1)"
    )
    return parser


def prepare_command(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        prepare(
            args.inputs,
            args.output,
            tokenizer=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer,
            shard_bytes=args.shard_bytes,
            glob=args.glob or DEFAULT_GLOBS,
            text_field=args.text_field,
            workers=args.workers,
            log=print,
        )
    except DataError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
