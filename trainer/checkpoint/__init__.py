"""Checkpoints: DeepSpeed's sharded per-rank files, committed so that none is ever half-written.

    checkpoints/step-00000100/          one committed checkpoint
        mp_rank_00_model_states.pt ...  DeepSpeed's files (model, optimizer shards, schedule)
        rng/rank-00003.pt               each rank's RNG states
        tessera_state.json              step, consumed samples, data cursor, layout
        config.yaml                     the resolved config of the run that saved it
        tokenizer/info.json             the tokenizer of the training data (kind, vocabulary, EOS)
        tokenizer/tokenizer.json        and its file, for a Hugging Face tokenizer: `generate`
                                        and `convert` read these, never the run's data paths
        manifest.json                   written last: every file with its size and sha256, the
                                        step, layout, model, config hash and Tessera version
    checkpoints/latest                  the committed tag, replaced atomically

Commit protocol: every rank writes into `step-N.tmp/` and fsyncs its files; rank 0 then writes the
manifest (fsynced), renames `step-N.tmp/` to `step-N/`, fsyncs the parent and replaces `latest`
(write, fsync, rename). A directory without a valid manifest is never loaded, so a kill at any
point leaves the previous checkpoint in charge. Retention removes a manifest before its files.

DeepSpeed writes and reads its files through a "checkpoint engine"; `TesseraCheckpointEngine` is
ours. `save` writes each file at once from the live tensors, or, with `checkpoint.async`, copies
the state to host memory with torch.distributed.checkpoint's stager (cached, pinned with CUDA
buffers) and writes on one background thread; either way it records size and sha256 as it goes.
`load` is `torch.load(weights_only=True)` with an allow-list of the few DeepSpeed types its files
hold, so DeepSpeed's own loads of model, ZeRO and pipeline-layer files are safe too.

Why not DeepSpeed's DecoupledCheckpointEngine (0.19.8): it commits inside the next
`engine.step()` and blocks that step until the files are written (ZeRO optimizer state goes to
its writer process uncopied, so the next update must wait); with ZeRO >= 1 it fails on CPU
(tensors that require grad cannot cross its process queue); it needs DeepSpeed's launcher's
CROSS_SIZE/CROSS_RANK; its "fast" writer needs an accelerator; it writes `latest` in place.
Why not DCP's async_save: it writes DCP's own format (which DeepSpeed's loader and zero_to_fp32
cannot read) and reads its `.metadata` back with pickle.load.
"""

from tessera.trainer.checkpoint.engine import TesseraCheckpointEngine, install
from tessera.trainer.checkpoint.files import (
    file_sha256,
    replace_text_atomically,
    safe_globals,
    safe_load,
    write_torch_file,
)
from tessera.trainer.checkpoint.format import (
    ARCHITECTURE_FIELDS,
    CONFIG_FILE,
    DELAY_ENV,
    FORMAT,
    FORMAT_VERSION,
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    TMP_SUFFIX,
    TOKENIZER_DIR,
    CarriedTokenizer,
    CheckpointError,
    TrainState,
    committed_steps,
    read_latest,
    step_of,
    tag_for,
)
from tessera.trainer.checkpoint.inspect import CheckpointInfo, inspect, list_checkpoints
from tessera.trainer.checkpoint.load import (
    carried_tokenizer,
    check_compatible,
    check_same_tokenizer,
    latest_tag,
    load,
    problems,
    read_manifest,
    read_state,
    resolve_step_dir,
    resume,
    saved_config,
    tokenizer_of,
    valid_step_dir,
)
from tessera.trainer.checkpoint.save import (
    apply_retention,
    canonical_shapes,
    delete_checkpoint,
    remove_uncommitted,
    save,
    wait,
)

__all__ = [
    "ARCHITECTURE_FIELDS", "CONFIG_FILE", "DELAY_ENV", "FORMAT", "FORMAT_VERSION", "LATEST_FILE",
    "MANIFEST_FILE", "STATE_FILE", "TMP_SUFFIX", "TOKENIZER_DIR", "CarriedTokenizer",
    "CheckpointError", "CheckpointInfo", "TesseraCheckpointEngine", "TrainState", "apply_retention",
    "canonical_shapes", "carried_tokenizer", "check_compatible", "check_same_tokenizer",
    "committed_steps",
    "delete_checkpoint", "file_sha256", "inspect", "install", "latest_tag", "list_checkpoints",
    "load", "problems", "read_latest", "read_manifest", "read_state", "remove_uncommitted",
    "replace_text_atomically", "resolve_step_dir", "resume", "safe_globals", "saved_config",
    "safe_load", "save", "step_of", "tag_for", "tokenizer_of", "valid_step_dir", "wait",
    "write_torch_file",
]
