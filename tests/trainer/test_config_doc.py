"""The configuration reference is generated from the dataclasses: every key has a meaning, the
README's copy is the generated one, and `tessera print-config --doc` prints it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tessera.cli import main
from tessera.trainer.config import Config, load_config
from tessera.trainer.config_doc import (
    DocError,
    field_comments,
    key_docs,
    readme_block,
    reference_markdown,
    update_readme,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        key = prefix + field.metadata.get("key", field.name)
        if dataclasses.is_dataclass(field.default_factory):
            keys.extend(all_keys(field.default_factory, key + "."))
        else:
            keys.append(key)
    return keys


def test_every_key_is_documented_with_its_default():
    docs = {doc.key: doc for doc in key_docs()}
    assert list(docs) == all_keys()
    assert all(doc.meaning for doc in docs.values())
    assert (
        docs["train.grad_clip"].default == "1.0"
        and "0 turns clipping off" in docs["train.grad_clip"].meaning
    )
    assert docs["checkpoint.async"].meaning.startswith("key `checkpoint.async`")  # comment above
    assert docs["train.eval_interval"].meaning.endswith("0: only at the end")  # continued
    assert docs["data.valid_shards"].type_name == "any" and docs["log.wandb_mode"].default == "null"


def test_readme_holds_the_generated_reference():
    text = README.read_text()
    start, end = readme_block(text)
    assert text[start:end] == reference_markdown(), (
        "README.md's configuration reference is stale: run "
        "`tessera print-config --doc --readme README.md`"
    )


def test_print_config_doc(capsys, tmp_path):
    assert main(["print-config", "--doc"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    copy = tmp_path / "README.md"
    copy.write_text(README.read_text().replace("| `train.lr` |", "| `train.old_lr` |"))
    assert main(["print-config", "--readme", str(copy), "--doc"]) == 0  # in either order
    assert copy.read_text() == README.read_text()
    assert update_readme(copy) is False


@pytest.mark.parametrize("argv, said", [
    (["--doc", "--config", "configs/demo.yaml"], "it takes no --config or overrides"),
    (["train.steps=5", "--doc"], "it takes no --config or overrides"),
    (["--readme", "README.md"], "--readme FILE goes with --doc"),
])
def test_print_config_doc_with_what_it_does_not_take_is_one_line(capsys, argv, said):
    with pytest.raises(SystemExit) as exit_:
        main(["print-config", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(said)


@dataclasses.dataclass
class Section:
    documented: int = 1  # a meaning
    forgotten: int = 2


@dataclasses.dataclass
class Top:
    section: Section = dataclasses.field(default_factory=Section)


def test_a_key_without_a_comment_is_refused():
    assert field_comments(Section) == {"documented": "a meaning", "forgotten": ""}
    with pytest.raises(DocError, match="config key 'section.forgotten' has no comment"):
        key_docs(Top)


def test_defaults_in_the_reference_load():
    """The reference's defaults are the schema's: a config built from them validates."""
    cfg = load_config(None, [])
    docs = {doc.key: doc.default for doc in key_docs()}
    assert docs["train.steps"] == str(cfg.train.steps)
    assert docs["run.dir"] == cfg.run.dir
