"""`tessera prepare`: tokenize text / JSON-lines files into WebDataset shards plus a manifest.

The layout is described in `tessera.data.format`. Output is deterministic: the same inputs and
tokenizer give byte-identical shards and manifest whatever the number of workers.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
from tessera.data.inputs import (
    DEFAULT_GLOBS,
    Document,
    InputFile,
    find_input_files,
    iter_all_documents,
    iter_documents,
    total_bytes,
)
from tessera.data.progress import Progress, clock_text, counted, human_count
from tessera.data.tokenizer import (
    HF_TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    find_tokenizer,
    json_text,
    train_bpe,
)
from tessera.data.verify import verify_command

__all__ = [
    "Document",
    "InputFile",
    "find_input_files",
    "iter_documents",
    "prepare",
    "prepare_command",
]

DEFAULT_SHARD_BYTES = 64 * 2**20
SHARD_NAME = "shard-%06d.tar"
SAMPLE_KEY = "%09d"
TMP_SUFFIX = ".tmp"
# Written after each finished shard of a run still in progress; gone once the manifest is.
JOURNAL_NAME = "prepare-progress.json"
# One tokenization task: up to this much text or this many documents. Small tasks keep the
# workers evenly loaded up to the end (a task costs well under a millisecond to hand over).
BATCH_TEXT_CHARS = 2**18
BATCH_MAX_DOCS = 1024

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Tokenization (in this process, or in a pool of worker processes)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], dtype: str) -> list[np.ndarray]:
    """Each text's ids (with what the tokenizer's post-processor adds) and EOS after them unless
    the post-processor ended with it, as `dtype`; an empty array for a text with no tokens."""
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
        if ids[-1] == tokenizer.eos_id:
            out.append(ids.astype(dtype))
            continue
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


def _init_worker(serialized_tokenizer: str | None, eos_id: int, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Parallelism comes from the processes; keep each one's Rust thread pool to itself.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if serialized_tokenizer is None:
        _worker_tokenizer = ByteTokenizer()
    else:
        _worker_tokenizer = HFTokenizer.from_str(serialized_tokenizer, eos_id=eos_id)
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
    serialized = json_text(tokenizer)
    context = multiprocessing.get_context("spawn")  # no fork after tokenizers' threads start
    # A process pool that reports a worker's death (the kernel's OOM killer, a kill -9) as
    # BrokenProcessPool; multiprocessing.Pool would wait for its result for ever.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(serialized, tokenizer.eos_id, dtype),
    )
    try:
        # A bounded window of tasks keeps memory flat; results are taken in submission order.
        pending: collections.deque = collections.deque()
        for batch in _batches(documents):
            pending.append((batch, pool.submit(_encode_in_worker, [d.text for d in batch])))
            if len(pending) >= 2 * workers:
                done_batch, result = pending.popleft()
                yield from zip(done_batch, result.result())
        while pending:
            done_batch, result = pending.popleft()
            yield from zip(done_batch, result.result())
    except BrokenProcessPool:
        raise DataError(
            "a tokenizer worker process died (killed, or out of memory?); the shards finished "
            "so far are kept: run the same command again to continue, perhaps with fewer "
            "--workers"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Shards


class ShardWriter:
    """Writes samples into shard-XXXXXX.tar files of about `shard_bytes` of token payload.

    Each shard is written as a .tmp file and renamed once closed, so a .tar file is complete;
    `on_close(shards, next_position)` then records it (the journal of a resumable run).
    """

    def __init__(
        self,
        directory: Path,
        dtype: str,
        shard_bytes: int,
        log: Log,
        finished: Sequence[ShardInfo] = (),
        on_close: Callable[[list[ShardInfo], tuple[int, int]], None] | None = None,
    ) -> None:
        self.directory = directory
        self.dtype = dtype
        self.shard_bytes = shard_bytes
        self.log = log
        self.shards: list[ShardInfo] = list(finished)
        self.on_close = on_close
        self._file = None
        self._tar = None
        self._tmp_path: Path | None = None
        self._num_tokens = 0
        self._num_samples = 0
        self._payload_bytes = 0
        self._next_position = (0, 0)

    def add(self, tokens: np.ndarray, doc: Document) -> None:
        if self._tar is None:
            self._open()
        payload = encode_tokens(tokens, self.dtype)
        meta = json.dumps({"source": doc.source, "doc": doc.index}, sort_keys=True).encode()
        key = SAMPLE_KEY % self._num_samples
        self._add_member(f"{key}.{META_EXT}", meta)  # extensions in sorted order, as webdataset
        self._add_member(f"{key}.{TOKENS_EXT}", payload)
        self._num_samples += 1
        self._num_tokens += int(tokens.size)
        self._payload_bytes += len(payload)
        self._next_position = (doc.file_index, doc.index + 1)
        if self._payload_bytes >= self.shard_bytes:
            self._close_current()

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_current()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error or an interruption)."""
        if self._tar is not None:
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = self._file = None

    def _open(self) -> None:
        self._tmp_path = self.directory / (SHARD_NAME % len(self.shards) + TMP_SUFFIX)
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 (open until the shard is full)
        # A plain streamed tar, as webdataset's TarWriter writes (without importing torch).
        self._tar = tarfile.open(  # noqa: SIM115 (open until the shard is full)
            fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT
        )
        self._num_tokens = self._num_samples = self._payload_bytes = 0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # reproducible shards
        self._tar.addfile(info, io.BytesIO(data))

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
        if self.on_close is not None:
            self.on_close(self.shards, self._next_position)
        self.log(
            f"wrote {final_path.name}: {counted(self._num_samples, 'document')}, "
            f"{counted(self._num_tokens, 'token')}"
        )


# ---------------------------------------------------------------------------------------------
# Resuming an interrupted run: the journal


def _fingerprint(files: Sequence[InputFile], options: dict) -> dict:
    """What must be unchanged for a re-run to continue the shards of an interrupted one."""
    inputs = []
    for f in files:
        stat = f.path.stat()
        inputs.append([f.source, stat.st_size, stat.st_mtime_ns])
    return {"inputs": inputs, **options}


def _describe_difference(saved: dict, current: dict) -> str:
    for key in sorted(set(saved) | set(current)):
        if key == "inputs":
            continue
        if saved.get(key) != current.get(key):
            return f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
    old = {entry[0]: entry for entry in saved.get("inputs", [])}
    for entry in current["inputs"]:
        if entry[0] not in old:
            return f"input {entry[0]} is new"
        if old[entry[0]] != entry:
            return f"input {entry[0]} changed (size or modification time)"
    return "the list of inputs changed"


def _write_journal(
    directory: Path, fingerprint: dict, shards: list[ShardInfo], next_position: tuple[int, int]
) -> None:
    path = directory / JOURNAL_NAME
    tmp = path.with_name(path.name + TMP_SUFFIX)
    record = {
        "fingerprint": fingerprint,
        "shards": [dataclasses.asdict(s) for s in shards],
        "next": list(next_position),
    }
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_journal(directory: Path) -> dict | None:
    path = directory / JOURNAL_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["shards"] = [ShardInfo(**s) for s in record["shards"]]
        record["next"] = tuple(record["next"])
        return record
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({e}); remove it to start over") from e


def _finished_shards(output_dir: Path, journal: dict | None, fingerprint: dict) -> dict | None:
    """The journal of an interrupted run with these inputs and options, or None (fresh)."""
    if journal is None:
        return None
    if journal["fingerprint"] != fingerprint:
        reason = _describe_difference(journal["fingerprint"], fingerprint)
        raise DataError(
            f"{output_dir}: holds an interrupted run of other inputs or options ({reason}); "
            f"rerun it with the same ones, or remove it"
        )
    for shard in journal["shards"]:
        if not (output_dir / shard.path).is_file():
            raise DataError(
                f"{output_dir / shard.path}: finished shard of the interrupted run "
                f"is missing; remove {output_dir} to start over"
            )
    return journal


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
    progress: Callable[[str], None] | None = None,
    progress_interval_s: float = 10.0,
    progress_bar: bool = False,
) -> Manifest:
    """Tokenize INPUTS into shards in OUTPUT and write its manifest (last). See the module doc.

    `tokenizer` is a tokenizer.json or a directory holding one (data.tokenizer.find_tokenizer:
    a Hugging Face model, prepared data, a checkpoint); `train_tokenizer_vocab` trains a
    byte-level BPE of that vocab size on the inputs first; neither means the built-in byte
    tokenizer. A run
    interrupted in OUTPUT continues after its last finished shard (same inputs and options).
    Progress: a line every `progress_interval_s` to `progress`, or a bar on the terminal.
    """
    start = time.perf_counter()
    globs = (glob,) if isinstance(glob, str) else tuple(glob)
    _check_options(tokenizer, train_tokenizer_vocab, shard_bytes, workers)
    output_dir = Path(output)
    _check_output(output_dir)
    files = find_input_files(inputs, globs)
    loaded: Tokenizer | None = find_tokenizer(tokenizer) if tokenizer is not None else None
    if loaded is not None:
        log(f"using tokenizer {tokenizer} (vocab size {loaded.vocab_size})")
    journal = _read_journal(output_dir) if output_dir.is_dir() else None
    output_dir.mkdir(parents=True, exist_ok=True)

    if train_tokenizer_vocab is not None:
        loaded = _trained_tokenizer(
            files, text_field, train_tokenizer_vocab, output_dir, reuse=journal is not None, log=log
        )
    tok: Tokenizer = loaded if loaded is not None else ByteTokenizer()
    dtype = token_dtype(tok.vocab_size)
    fingerprint = _fingerprint(
        files,
        {
            "text_field": text_field,
            "shard_bytes": shard_bytes,
            "dtype": dtype,
            "tokenizer": _tokenizer_id(tok),
            "train_tokenizer_vocab": train_tokenizer_vocab,
        },
    )
    resumed = _finished_shards(output_dir, journal, fingerprint)
    finished = resumed["shards"] if resumed else []
    next_position = resumed["next"] if resumed else (0, 0)
    _remove_stale(output_dir, keep={s.path for s in finished})
    if resumed:
        log(f"resuming an interrupted run: {counted(len(finished), 'shard')} already finished")

    def record(shards: list[ShardInfo], position: tuple[int, int]) -> None:
        _write_journal(output_dir, fingerprint, shards, position)

    writer = ShardWriter(output_dir, dtype, shard_bytes, log, finished, on_close=record)
    meter = _progress_meter(files, next_position, progress, progress_interval_s, progress_bar)
    offsets = _file_offsets(files)
    try:
        documents = iter_all_documents(files, text_field, start=next_position)
        for doc, tokens in tokenize(documents, tok, dtype, workers):
            if tokens.size:
                writer.add(tokens, doc)
            if meter is not None:
                done_bytes = offsets[doc.file_index] + doc.end_byte
                meter.advance(max(0, done_bytes - meter.done), documents=1,
                              tokens=int(tokens.size))
        shards = writer.finish()
    except BaseException:
        writer.abort()
        if meter is not None:
            meter.finish(completed=False)  # a bar is closed before the error message
        raise
    if meter is not None:
        meter.finish(completed=bool(shards))
    if not shards:
        raise DataError(f"{', '.join(inputs)}: empty input (no documents with any tokens)")

    if isinstance(tok, HFTokenizer):
        tok.save(output_dir)
    manifest = Manifest(tokenizer=tok.info(), dtype=dtype, shards=tuple(shards))
    write_manifest(output_dir, manifest)
    (output_dir / JOURNAL_NAME).unlink(missing_ok=True)
    _log_summary(log, manifest, output_dir, time.perf_counter() - start)
    return manifest


def _trained_tokenizer(
    files, text_field: str, vocab_size: int, output_dir: Path, *, reuse: bool, log: Log
) -> HFTokenizer:
    """Train a BPE on the inputs and save it in OUTPUT at once; an interrupted run's is reused."""
    saved = output_dir / HF_TOKENIZER_FILE
    if reuse and saved.is_file():
        log(f"reusing the tokenizer trained by the interrupted run ({saved})")
        return HFTokenizer.from_file(saved)
    log(f"training a byte-level BPE tokenizer (vocab {vocab_size})")
    texts = (doc.text for doc in iter_all_documents(files, text_field))
    trained = train_bpe(texts, vocab_size)
    trained.save(output_dir)
    log(f"trained tokenizer: vocab size {trained.vocab_size}")
    return trained


def _tokenizer_id(tok: Tokenizer) -> str:
    if isinstance(tok, HFTokenizer):
        return "hf:" + hashlib.sha256(tok.to_str().encode()).hexdigest()
    return "bytes"


def _progress_meter(
    files: Sequence[InputFile],
    start: tuple[int, int],
    write: Callable[[str], None] | None,
    interval_s: float,
    bar: bool,
) -> Progress | None:
    """Input bytes done out of all of them (a resumed run starts where it left off)."""
    if write is None and not bar:
        return None
    done = sum(f.num_bytes for f in files[: start[0]])
    return Progress("prepare", total_bytes(files), "B", write=write, interactive=bar,
                    interval_s=interval_s, done=done)


def _file_offsets(files: Sequence[InputFile]) -> list[int]:
    """Input bytes before each file (for the progress line)."""
    offsets, total = [], 0
    for f in files:
        offsets.append(total)
        total += f.num_bytes
    return offsets


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
    """--output is new, empty (but for a killed run's temporary files), or an interrupted run of
    ours (its journal says so): prepare never overwrites or deletes a file it did not write."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: --output exists and is not a directory")
    if (output_dir / MANIFEST_NAME).exists():
        raise DataError(f"{output_dir}: already prepared (its {MANIFEST_NAME} is written), so "
                        f"nothing was done; to prepare it again, remove it or choose another "
                        f"--output")
    if output_dir.is_dir() and not (output_dir / JOURNAL_NAME).exists():
        foreign = sorted(p.name for p in output_dir.iterdir() if not p.name.endswith(TMP_SUFFIX))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                              else "")
            raise DataError(f"{output_dir}: --output holds files tessera prepare did not write "
                            f"({shown}); choose a new or empty directory")


def _remove_stale(output_dir: Path, keep: set[str]) -> None:
    """Drop temp files, and shards no journal vouches for (half a run that never recorded)."""
    for stale in output_dir.glob("*" + TMP_SUFFIX):
        stale.unlink()
    for stale in output_dir.glob("shard-*.tar"):
        if stale.name not in keep:
            stale.unlink()


def _log_summary(log: Log, manifest: Manifest, output_dir: Path, seconds: float) -> None:
    """prepared 1,204 documents, 3,410,220 tokens in 2 shards to OUT in 0:41 (29.4
    documents/s, 83.2k tokens/s): the counts exact, the rates as the progress line gives them."""
    seconds = max(seconds, 1e-9)
    took = f"{seconds:.1f} s" if seconds < 60 else clock_text(seconds)
    log(
        f"prepared {counted(manifest.num_samples, 'document')}, "
        f"{counted(manifest.num_tokens, 'token')} in {counted(len(manifest.shards), 'shard')} to "
        f"{output_dir} in {took} "
        f"({human_count(manifest.num_samples / seconds, fraction_below_1000=True)} documents/s, "
        f"{human_count(manifest.num_tokens / seconds, fraction_below_1000=True)} tokens/s)"
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
        usage="%(prog)s INPUT [INPUT ...] --output DIR [options]\n       %(prog)s --verify DIR",
        description="Tokenize text (.txt: one document per file), JSON lines (.jsonl, "
        ".jsonl.gz, .jsonl.zst: one document per line) and parquet (one per row) into "
        "WebDataset shards plus a manifest. Rerun the same command after an interruption: "
        "it continues after the last finished shard.",
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files, or directories to search recursively"
    )
    parser.add_argument("--output", metavar="DIR", help="directory to write")
    parser.add_argument(
        "--verify",
        metavar="DIR",
        help="check every shard of a prepared directory against its manifest",
    )
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a tokenizer.json, or a directory with one: a Hugging Face model's, prepared data, "
        "or a checkpoint (from-hf's carries its model's tokenizer)",
    )
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
    parser.add_argument(
        "--text-field", default="text", help="the document field of .jsonl records and parquet rows"
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="tokenizer processes (default: 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    return parser


def prepare_command(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else 2
    if args.verify is not None:
        if args.inputs or args.output:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: --verify takes only the directory", file=sys.stderr)
            return 2

        return verify_command(args.verify)
    if not args.inputs or not args.output:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: give INPUT files and --output DIR", file=sys.stderr)
        return 2
    bar = sys.stderr.isatty() and not args.no_progress
    lines = None if args.no_progress or bar else _stderr_line
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
            progress=lines,
            progress_bar=bar,
        )
    except DataError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
