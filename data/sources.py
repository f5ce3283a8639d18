"""What the loader reads: `data.shards` or `data.sources`, resolved to shards with token counts.

Every shard must be listed in the manifest of its own directory: the manifest's token counts are
what lets the loader jump to any position without reading earlier data.

A shard is named by a local path (or a glob of them), or by any URL webdataset's `gopen` opens
(https://, s3 through `pipe:`, ...). For a URL the manifest is found beside the shard: the shard's
file name is replaced by `manifest.json` (in a `pipe:` command, its last `*.tar` word). A URL that
names the manifest itself (`.../manifest.json`, or `pipe:... manifest.json ...`) stands for every
shard it lists. Brace patterns expand everywhere; globs only on local paths.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand
from webdataset.gopen import gopen

from tessera.data.format import (
    MANIFEST_NAME,
    DataError,
    Manifest,
    TokenizerInfo,
    file_in,
    first_line,
    parse_manifest,
    read_manifest,
)
from tessera.data.tokenizer import HF_TOKENIZER_FILE

ShardsSpec = str | os.PathLike | Sequence[str | os.PathLike]
SHARD_SUFFIX = ".tar"  # what `tessera prepare` names its shards (WebDataset tar files)
DEFAULT_SOURCE = "default"  # the name of the one source `data.shards` makes
SOURCE_KEYS = ("name", "shards", "weight")

log = logging.getLogger("tessera.data")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A word of a pipe: command; its last path component is group "name".
_PIPE_WORD = re.compile(r"(?:[^\s'\"]*/)?(?P<name>[^\s'\"/]+)(?=$|[\s'\"])")


@dataclasses.dataclass(frozen=True)
class ResolvedShard:
    path: str  # absolute local path, or the URL gopen opens
    num_tokens: int  # from the manifest of the shard's directory
    num_samples: int
    dtype: str
    vocab_size: int = 2**32
    eos_id: int = 0
    sha256: str | None = None  # the manifest's; the reader checks each read against it

    @property
    def url(self) -> str:
        return self.path

    @property
    def name(self) -> str:
        """The shard's file name (for a pipe: command, the file it reads)."""
        return shard_file_name(self.path)


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of `data.sources` (or all of `data.shards`): a weighted set of shards."""

    name: str
    weight: float  # from step 0 on
    shards: tuple[ResolvedShard, ...]
    # a mixture schedule: (step, weight) pairs, piecewise constant from each step on, the first
    # at step 0 (then `weight` is its weight); empty: `weight` throughout
    weight_steps: tuple[tuple[int, float], ...] = ()

    def weight_at(self, step: int) -> float:
        """The weight of optimizer step `step` (0-based)."""
        current = self.weight
        for start, weight in self.weight_steps:
            if start > step:
                break
            current = weight
        return current

    @property
    def key(self) -> int:
        """A stable number for seeding this source's shard order (independent of list order)."""
        return zlib.crc32(self.name.encode())

    @property
    def fingerprint(self) -> str:
        return shards_fingerprint(self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or bool(_URL_SCHEME.match(spec))


def _pipe_target(command: str) -> re.Match | None:
    """The last word of a pipe: command that names a shard (*.tar) or the manifest."""
    targets = [
        m
        for m in _PIPE_WORD.finditer(command)
        if m["name"].endswith(SHARD_SUFFIX) or m["name"] == MANIFEST_NAME
    ]
    return targets[-1] if targets else None


def shard_file_name(location: str) -> str:
    if location.startswith("pipe:"):
        target = _pipe_target(location)
        return target["name"] if target else location
    return location.rstrip("/").rsplit("/", 1)[-1]


def _sibling_url(url: str, name: str) -> str:
    """The URL of file `name` in the same directory as the file `url` names."""
    if url.startswith("pipe:"):
        target = _pipe_target(url)
        if target is None:
            raise DataError(
                f"{url}: cannot find the shard or manifest file name in this pipe: command "
                f"(expected a word ending in .tar or manifest.json)"
            )
        return url[: target.start("name")] + name + url[target.end("name") :]
    base = url if url.endswith("/") else url.rsplit("/", 1)[0] + "/"
    return base + name


# ---------------------------------------------------------------------------------------------
# Manifests (local directories or URLs), cached per run


class _ManifestCache:
    def __init__(self) -> None:
        self._by_location: dict[str, tuple[Manifest, dict[str, ResolvedShard]]] = {}

    def local(self, directory: str) -> tuple[Manifest, dict[str, ResolvedShard]]:
        directory = os.path.abspath(directory)
        if directory not in self._by_location:
            manifest = read_manifest(directory)
            shards = [
                _resolved(os.path.join(directory, s.path), s, manifest) for s in manifest.shards
            ]
            self._by_location[directory] = (manifest, {s.path: s for s in shards})
        return self._by_location[directory]

    def remote(self, manifest_url: str) -> tuple[Manifest, dict[str, ResolvedShard]]:
        if manifest_url not in self._by_location:
            manifest = parse_manifest(_read_url(manifest_url), manifest_url)
            shards = [
                _resolved(_sibling_url(manifest_url, s.path), s, manifest) for s in manifest.shards
            ]
            self._by_location[manifest_url] = (manifest, {s.name: s for s in shards})
        return self._by_location[manifest_url]

    def items(self) -> list[tuple[str, Manifest]]:
        return [(where, m) for where, (m, _) in self._by_location.items()]


def _tokenizer_file(directory: str, name: str) -> Path:
    """DIRECTORY/NAME, the tokenizer file the directory's manifest names, kept inside it."""
    return file_in(directory, name, f"{os.path.join(directory, MANIFEST_NAME)}: key "
                                    f"'tokenizer.file'")


def _resolved(location: str, info, manifest: Manifest) -> ResolvedShard:
    return ResolvedShard(
        path=location,
        num_tokens=info.num_tokens,
        num_samples=info.num_samples,
        dtype=manifest.dtype,
        vocab_size=manifest.tokenizer.vocab_size,
        eos_id=manifest.tokenizer.eos_id,
        sha256=info.sha256,
    )


def _read_url(url: str, what: str = "the manifest") -> str:
    try:
        stream = gopen(url, "rb")
        try:
            data = stream.read()
        finally:
            stream.close()
    except Exception as e:  # gopen raises OSError, ValueError or the scheme's own errors
        raise DataError(f"{url}: cannot read {what} ({first_line(e)})") from e
    if not data:
        raise DataError(f"{url}: cannot read {what} (nothing came back)")
    return data.decode("utf-8", errors="replace")



# ---------------------------------------------------------------------------------------------
# Resolving one spec


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _resolve_directory(directory: str, cache: _ManifestCache) -> list[ResolvedShard]:
    _, by_path = cache.local(directory)
    if not by_path:
        raise DataError(f"{os.path.join(directory, MANIFEST_NAME)}: the manifest lists no shards")
    for shard in by_path.values():
        if not os.path.isfile(shard.path):
            raise DataError(f"{shard.path}: shard listed in its manifest is missing on disk")
    return list(by_path.values())


def _resolve_file(path: str, cache: _ManifestCache, key: str) -> ResolvedShard:
    path = os.path.abspath(path)
    if os.path.basename(path) == MANIFEST_NAME:
        return None  # type: ignore[return-value]  (handled by the caller as a directory)
    try:
        _, by_path = cache.local(os.path.dirname(path))
    except DataError:  # its directory has no (readable) manifest
        if path.endswith(SHARD_SUFFIX):
            raise
        by_path = {}
    if path not in by_path and not path.endswith(SHARD_SUFFIX):  # not the manifest's fault
        raise DataError(f"{path}: not a shard ({SHARD_SUFFIX}) of a directory written by "
                        f"`tessera prepare` ({key}); give that directory, or its shards")
    if path not in by_path:
        manifest_path = os.path.join(os.path.dirname(path), MANIFEST_NAME)
        raise DataError(f"{path}: shard is not listed in {manifest_path}")
    return by_path[path]


def _resolve_local(pattern: str, cache: _ManifestCache, key: str) -> list[ResolvedShard]:
    shards: list[ResolvedShard] = []
    for expanded in braceexpand.braceexpand(pattern):
        if _has_glob_magic(expanded):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise DataError(f"{key}: {expanded!r} matched nothing")
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise DataError(f"{expanded}: no such shard or directory ({key})")
        for match in matches:
            if os.path.isdir(match):
                shards.extend(_resolve_directory(match, cache))
            elif os.path.basename(match) == MANIFEST_NAME:
                shards.extend(_resolve_directory(os.path.dirname(os.path.abspath(match)), cache))
            else:
                shards.append(_resolve_file(match, cache, key))
    return shards


def _resolve_url(pattern: str, cache: _ManifestCache, key: str) -> list[ResolvedShard]:
    if pattern.startswith("file:"):
        return _resolve_local(re.sub(r"^file://?", "/", pattern), cache, key)
    shards: list[ResolvedShard] = []
    for url in braceexpand.braceexpand(pattern):
        name = shard_file_name(url)
        if name == MANIFEST_NAME or url.endswith("/"):
            manifest_url = url if name == MANIFEST_NAME else url + MANIFEST_NAME
            _, by_name = cache.remote(manifest_url)
            if not by_name:
                raise DataError(f"{manifest_url}: the manifest lists no shards")
            shards.extend(by_name.values())
            continue
        manifest_url = _sibling_url(url, MANIFEST_NAME)
        _, by_name = cache.remote(manifest_url)
        if name not in by_name:
            raise DataError(f"{url}: shard {name} is not listed in {manifest_url}")
        shards.append(dataclasses.replace(by_name[name], path=url))
    return shards


def _tokenizer_identity(location: str, info: TokenizerInfo) -> tuple:
    """What must agree across manifests: ids mean the same tokens (hf: same tokenizer file)."""
    file_sha256 = None
    if info.kind == "hf" and info.file is not None and not is_url(location):
        path = _tokenizer_file(location, info.file)
        if path.is_file():
            file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return (info.kind, info.vocab_size, info.eos_id, file_sha256)


def _check_consistent(cache: _ManifestCache, what: str = "data.shards") -> None:
    items = cache.items()
    first_where, first = items[0]
    first_tokenizer = _tokenizer_identity(first_where, first.tokenizer)
    for where, manifest in items[1:]:
        if manifest.dtype != first.dtype:
            raise DataError(
                f"{where}: token dtype {manifest.dtype} differs from {first.dtype} "
                f"of {first_where} ({what} mixes prepared directories)"
            )
        if _tokenizer_identity(where, manifest.tokenizer) != first_tokenizer:
            raise DataError(
                f"{where}: tokenizer differs from the one of {first_where} "
                f"({what} mixes prepared directories)"
            )


def _resolve(spec: ShardsSpec, cache: _ManifestCache, key: str) -> list[ResolvedShard]:
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards: list[ResolvedShard] = []
    for item in items:
        text = os.fspath(item)
        shards.extend(_resolve_url(text, cache, key) if is_url(text)
                      else _resolve_local(text, cache, key))
    if not shards:
        raise DataError(f"{key}: {spec!r} matched nothing")
    seen: set[str] = set()
    for shard in shards:
        if shard.path in seen:
            raise DataError(f"{shard.path}: shard named twice by {key}")
        seen.add(shard.path)
    return shards


def _drop_empty(shards: list[ResolvedShard], key: str) -> list[ResolvedShard]:
    kept = []
    for shard in shards:
        if shard.num_tokens == 0:
            log.warning("tessera data: warning: %s: empty shard (no tokens); skipped", shard.path)
        else:
            kept.append(shard)
    if not kept:
        raise DataError(f"{key}: every shard is empty (no tokens)")
    return kept


def resolve_shards(spec: ShardsSpec) -> list[ResolvedShard]:
    """The shards named by `data.shards`, in order (empty shards dropped with a warning).

    `spec` is a prepared directory (all its shards in manifest order), a glob and/or brace
    pattern of shard files, a URL (see the module doc), or a list of those.
    """
    cache = _ManifestCache()
    shards = _resolve(spec, cache, "data.shards")
    _check_consistent(cache)
    return _drop_empty(shards, "data.shards")


def shards_fingerprint(shards: Sequence[ResolvedShard]) -> str:
    """Identifies the shard list for resume checks; file names only, so the data may move."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.name}\t{shard.num_tokens}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# data.sources


def _source_error(index: int, field: str | None, message: str) -> DataError:
    key = f"data.sources[{index}]" + (f".{field}" if field else "")
    return DataError(f"config key '{key}': {message}")


def _parse_source_entry(index: int, entry: Any) -> tuple[str, Any, float]:
    if not isinstance(entry, dict):
        raise _source_error(
            index, None, f"must be a mapping {{name, shards, weight}}, got {entry!r}"
        )
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise _source_error(index, None, f"unknown key {unknown[0]!r} (keys: name, shards, weight)")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise _source_error(index, "name", f"must be a non-empty name without '/', got {name!r}")
    shards = entry.get("shards")
    if not (
        isinstance(shards, str)
        or (isinstance(shards, list) and shards and all(isinstance(s, str) for s in shards))
    ):
        raise _source_error(index, "shards", f"must be a path, pattern or list, got {shards!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, (list, tuple)):
        return name, shards, _weight_steps(index, weight)
    _check_weight(index, weight)
    if weight == 0:
        raise _source_error(index, "weight", "must be positive, got 0")
    return name, shards, float(weight)


def _check_weight(index: int, weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise _source_error(index, "weight", f"must be a number or a list of [step, weight] "
                                             f"pairs, got {weight!r}")
    if not (math.isfinite(weight) and weight >= 0):
        raise _source_error(index, "weight", f"must be positive, got {weight!r}")


def _weight_steps(index: int, pairs: Sequence[Any]) -> tuple[tuple[int, float], ...]:
    """[[step, weight], ...]: steps increasing from 0; a weight may be 0 (the source waits)."""
    steps: list[tuple[int, float]] = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and isinstance(pair[0], int) and not isinstance(pair[0], bool)):
            raise _source_error(index, "weight", f"a schedule is a list of [step, weight] pairs, "
                                                 f"got {pair!r}")
        _check_weight(index, pair[1])
        if steps and pair[0] <= steps[-1][0]:
            raise _source_error(index, "weight", f"schedule steps must increase, got {pair[0]} "
                                                 f"after {steps[-1][0]}")
        steps.append((pair[0], float(pair[1])))
    if not steps or steps[0][0] != 0:
        raise _source_error(index, "weight", f"a schedule starts at step 0, got {pairs!r}")
    return tuple(steps)


def resolve_sources(entries: Sequence[Any]) -> list[Source]:
    """`data.sources`: a list of {name, shards, weight}; every source's data must share one
    tokenizer and dtype."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise DataError(f"config key 'data.sources': must be a non-empty list, got {entries!r}")
    cache = _ManifestCache()
    sources = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        name, spec, weight_or_steps = _parse_source_entry(index, entry)
        if name in names:
            raise _source_error(index, "name", f"{name!r} names two sources")
        names.add(name)
        key = f"data.sources[{index}].shards"
        shards = _drop_empty(_resolve(spec, cache, key), key)
        if isinstance(weight_or_steps, tuple):
            source = Source(name, weight_or_steps[0][1], tuple(shards), weight_or_steps)
        else:
            source = Source(name, weight_or_steps, tuple(shards))
        sources.append(source)
    _check_consistent(cache, "data.sources")
    _check_schedule_segments(sources)
    everywhere: set[str] = set()
    for source in sources:
        for shard in source.shards:
            if shard.path in everywhere:
                raise DataError(f"{shard.path}: shard belongs to two of data.sources")
            everywhere.add(shard.path)
    return sources


def schedule_steps(sources: Sequence[Source]) -> list[int]:
    """The steps at which some source's weight is set: 0 and each change of a schedule."""
    return sorted({0, *(step for s in sources for step, _ in s.weight_steps)})


def _check_schedule_segments(sources: Sequence[Source]) -> None:
    for step in schedule_steps(sources):
        if not any(s.weight_at(step) > 0 for s in sources):
            raise DataError(f"config key 'data.sources': from step {step} every weight is 0 "
                            f"(a segment of the mixture schedule needs a positive weight)")


def resolve_data(shards: ShardsSpec | None, sources: Sequence[Any] | None) -> list[Source]:
    """The sources of a job: `data.sources`, or `data.shards` as one source of weight 1."""
    if shards is not None and sources:
        raise DataError("config keys 'data.shards' and 'data.sources': set one, not both")
    if sources:
        return resolve_sources(sources)
    if shards is None:
        raise DataError(
            "config key 'data.shards': not set; point it at a `tessera prepare` output "
            "(or list weighted data.sources)"
        )
    return [Source(name=DEFAULT_SOURCE, weight=1.0, shards=tuple(resolve_shards(shards)))]


def prepared_tokenizer(shard: ResolvedShard) -> tuple[TokenizerInfo, str | None]:
    """The tokenizer `shard` was prepared with: its manifest's description and, for a Hugging
    Face tokenizer, the text of its tokenizer.json. Read beside the shard, the way the shard is
    read (a local directory, or the URL or pipe: command of the user's own data.shards), so
    that a checkpoint can carry it (`generate` and `convert` then never open data paths)."""
    if is_url(shard.path):
        manifest_url = _sibling_url(shard.path, MANIFEST_NAME)
        info = parse_manifest(_read_url(manifest_url), manifest_url).tokenizer
        read = lambda name: _read_url(_sibling_url(shard.path, name), "the tokenizer")  # noqa: E731
    else:
        directory = os.path.dirname(shard.path)
        info = read_manifest(directory).tokenizer
        read = lambda name: _tokenizer_file(directory, name).read_text()  # noqa: E731
    if info.kind != "hf":
        return info, None
    name = info.file or HF_TOKENIZER_FILE
    try:
        return info, read(name)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{shard.path}: cannot read the tokenizer {name} beside it ({e})") from e


def data_vocab_size(sources: Sequence[Source]) -> int:
    return sources[0].shards[0].vocab_size


def describe_sources(sources: Sequence[Source]) -> str:
    return json.dumps({s.name: [list(p) for p in s.weight_steps] or s.weight for s in sources})
