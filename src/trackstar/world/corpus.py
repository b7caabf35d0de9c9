"""Real corpora through `datasets`: the open set, and our models' pretraining corpus.

A :class:`CorpusSpec` names a corpus (``source``: ``hf``, a hub dataset by
``name``/``config``/``split`` or a ``save_to_disk`` directory by ``path``;
``jsonl`` or ``parquet``, files by ``path``, globs allowed), the field that
holds the text, at most how many documents (``max_docs``) and whether to
stream them. Documents are cut into passages of ``passage_words`` words
(about the 128-token context of our models; a run of more than
:data:`MAX_WORD_CHARS` characters without whitespace counts as one word per
that many characters, so no passage exceeds ``passage_words`` × 65
characters: a 2 MB line without spaces is many passages, not one that
stalls tokenizer training), or of ``passage_tokens`` tokens of a given
tokenizer (a Hugging Face model's own context); each passage's id
is ``<document row>-<passage index>``, stable across runs and machines.

:func:`corpus_world` writes a world whose open set is that corpus: the base
world's facts, closed set and queries, with each passage judged against the
facts (``judge: exact``, the embedded world's :func:`~.annotate.states_fact`,
for the facts whose relation it knows). Passages stream from the dataset to
the file one at a time, so building it holds one passage in memory whatever
the corpus size (``streaming: true`` keeps `datasets` from materializing it
too); later stages load the open set they score.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import (
    ArtifactError,
    atomic_directory,
    config_hash,
    input_digest,
    is_complete,
    read_json,
    read_jsonl,
)
from .annotate import entity_names, states_fact
from .relations import RELATIONS
from .store import CARD_FILES, CORPUS_FILE, FACTS_FILE, MANIFEST, write_manifest

SOURCES = ("hf", "jsonl", "parquet")
JUDGES = ("exact",)


class CorpusError(ValueError):
    """A corpus that cannot be read as configured."""


def _setting(default, help: str, flag: str | None = None):
    """A corpus setting: its default, what it means (the CLI's help and the config's
    documentation), and its CLI flag when that is not ``--corpus-<name>``."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class CorpusSpec:
    """A real corpus as the open set and our models' pretraining corpus.

    The one home of the corpus settings: the run config's ``corpus`` group
    (``experiment/schema.py``) and the CLI's ``--corpus-*`` flags are derived
    from these fields.
    """

    source: str | None = _setting(None, "hf (a hub dataset by name, or a save_to_disk directory by path), jsonl or "
                                  "parquet (files by path, globs allowed); unset: the world's own open set")
    path: str | None = _setting(None, "jsonl / parquet file or glob, or a save_to_disk directory")
    name: str | None = _setting(None, "hub dataset name, e.g. allenai/c4 (needs a network)")
    config: str | None = _setting(None, "hub dataset config, e.g. en")
    split: str = _setting("train", "dataset split")
    text_field: str = _setting("text", "the field holding each document's text", "--text-field")
    max_docs: int | None = _setting(None, "at most this many documents (unset: all)", "--max-docs")
    streaming: bool = _setting(False, "stream the dataset instead of materializing it (C4-sized corpora)",
                               "--streaming")
    passage_words: int = _setting(96, "words per passage (about the 128-token context of our models)",
                                  "--passage-words")
    judge: str = _setting("exact", "which facts a passage states: exact (the embedded world's phrasings)")

    def __post_init__(self) -> None:
        if self.path:  # one spelling of a path, so the cache key hashes the files it names
            object.__setattr__(self, "path", str(Path(self.path).expanduser().resolve()))
        if self.source not in SOURCES:
            raise CorpusError(f"corpus.source={self.source!r}: use one of {SOURCES}.")
        if self.source == "hf" and not (self.name or self.path):
            raise CorpusError("corpus.source=hf needs corpus.name (a hub dataset) or corpus.path (a save_to_disk "
                              "directory).")
        if self.source != "hf" and not self.path:
            raise CorpusError(f"corpus.source={self.source} needs corpus.path (a file or a glob).")
        if self.max_docs is not None and (isinstance(self.max_docs, bool) or self.max_docs < 1):
            raise CorpusError(f"corpus.max_docs={self.max_docs!r}: give a positive number, or null for all.")
        if isinstance(self.passage_words, bool) or self.passage_words < 1:
            raise CorpusError(f"corpus.passage_words={self.passage_words!r}: give a positive number of words.")
        if self.judge not in JUDGES:
            raise CorpusError(f"corpus.judge={self.judge!r}: use one of {JUDGES}.")

    def check_paths(self) -> None:
        """Local files or directories named by ``path`` exist (before any work)."""
        if self.source != "hf":
            _files(self.path)
        elif self.path and not Path(self.path).expanduser().is_dir():
            raise CorpusError(f"corpus.path={self.path!r}: not a directory written by Dataset.save_to_disk.")

    def key(self) -> str:
        """What the corpus's passages are a function of (local files by content)."""
        settings = asdict(self)
        if self.path and self.source != "hf":
            settings["files"] = {str(p): input_digest(p) for p in _files(self.path)}
        elif self.path:
            settings["files"] = {str(p.relative_to(self.path)): input_digest(p)
                                 for p in sorted(Path(self.path).rglob("*")) if p.is_file()}
        return config_hash(settings)


def _files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    files = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise CorpusError(f"corpus.path={pattern!r}: no such file{'s' if not files else ' ' + str(missing[0])}.")
    return files


def _dataset(spec: CorpusSpec):
    import datasets  # heavy, and only a real corpus needs it

    if spec.source == "hf" and spec.path:
        if not Path(spec.path).expanduser().is_dir():
            raise CorpusError(f"corpus.path={spec.path!r}: not a directory written by Dataset.save_to_disk.")
        data = datasets.load_from_disk(str(Path(spec.path).expanduser()))
        if isinstance(data, datasets.DatasetDict):
            if spec.split not in data:
                raise CorpusError(f"corpus.split={spec.split!r}: {spec.path!r} has splits {sorted(data)}.")
            data = data[spec.split]
        return data.to_iterable_dataset() if spec.streaming else data
    if spec.source == "hf":
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=spec.streaming)
    builder = "json" if spec.source == "jsonl" else "parquet"
    return datasets.load_dataset(builder, data_files=[str(p) for p in _files(spec.path)], split="train",
                                 streaming=spec.streaming)


def _check_jsonl(files: list[Path]) -> None:
    """A :class:`CorpusError` naming the file and line of the first line of ``files`` that
    is not UTF-8 JSON (one pass, one line in memory at a time): run once `datasets` has
    failed on them, whose own error names neither."""
    for path in files:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        json.loads(line)
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"{path} line {line_no}: byte {raw[exc.start]:#04x} is not UTF-8; a jsonl corpus "
                                      "is UTF-8 JSON, one document per line. Re-encode the file.") from None
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path} line {line_no}: not valid JSON ({exc.msg} at column {exc.colno}); a "
                                      "jsonl corpus has one JSON document per line. Fix or drop that line.") from None


def iter_documents(spec: CorpusSpec) -> Iterator[tuple[int, str]]:
    """(row, text) of each document, at most ``max_docs``, in the dataset's order."""
    try:
        yield from _documents(spec)
    except CorpusError:
        raise
    except Exception:
        if spec.source == "jsonl":
            _check_jsonl(_files(spec.path))
        raise


def _documents(spec: CorpusSpec) -> Iterator[tuple[int, str]]:
    data = _dataset(spec)
    columns = getattr(data, "column_names", None)
    if columns is not None and spec.text_field not in columns:
        raise CorpusError(f"corpus.text_field={spec.text_field!r}: the dataset has no such field; its fields are "
                          f"{sorted(columns)}.")
    for row, record in enumerate(data):
        if spec.max_docs is not None and row >= spec.max_docs:
            return
        if spec.text_field not in record:
            raise CorpusError(f"corpus.text_field={spec.text_field!r}: the dataset has no such field; its fields "
                              f"are {sorted(record)}.")
        text = record[spec.text_field]
        if isinstance(text, str) and text.strip():
            yield row, text


#: The longest run of non-whitespace characters that counts as one word of a passage.
MAX_WORD_CHARS = 64


def passages(spec: CorpusSpec, tokenizer=None, passage_tokens: int | None = None) -> Iterator[dict]:
    """``{"doc_id", "text"}`` per passage: ``passage_words`` words, or ``passage_tokens``
    tokens of ``tokenizer`` when both are given."""
    for row, text in iter_documents(spec):
        if tokenizer is not None and passage_tokens:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces = [tokenizer.decode(ids[i:i + passage_tokens]) for i in range(0, len(ids), passage_tokens)]
        else:
            words = [w[i:i + MAX_WORD_CHARS] for w in text.split() for i in range(0, len(w), MAX_WORD_CHARS)]
            pieces = [" ".join(words[i:i + spec.passage_words]) for i in range(0, len(words), spec.passage_words)]
        for k, piece in enumerate(p for p in pieces if p.strip()):
            yield {"doc_id": f"{row}-{k}", "text": piece}


class ExactJudge:
    """Which facts a passage states, by the embedded world's phrasings (see :mod:`.annotate`)."""

    def __init__(self, facts: list[dict]):
        self.facts = [f for f in facts if f["relation"] in RELATIONS]
        self.unjudged = len(facts) - len(self.facts)
        # Facts by the first word of their subject: a passage only needs checking
        # against facts whose subject's first word it contains.
        self.by_word: dict[str, list[dict]] = {}
        for f in self.facts:
            for name in entity_names(f, 0):
                words = re.findall(r"[a-z0-9]+", name.lower())
                bucket = self.by_word.setdefault(words[0] if words else "", [])
                if not bucket or bucket[-1] is not f:
                    bucket.append(f)

    def __call__(self, text: str) -> list[str]:
        words = set(re.findall(r"[a-z0-9]+", text.lower()))
        candidates = {id(f): f for w in words & self.by_word.keys() for f in self.by_word[w]}
        return sorted({f["fact_id"] for f in candidates.values() if states_fact(text, f)})


def corpus_world(base: str | os.PathLike, spec: CorpusSpec, out_dir: str | os.PathLike, tokenizer=None,
                 passage_tokens: int | None = None) -> Path:
    """The world ``base`` with ``spec``'s passages as its open set (written once, atomically)."""
    base, out_dir = Path(base), Path(out_dir)
    key = config_hash({"base": read_json(base / MANIFEST)["content_hash"], "corpus": spec.key(),
                       "passage_tokens": passage_tokens if tokenizer is not None else None})
    if out_dir.exists():
        if is_complete(out_dir) and read_json(out_dir / MANIFEST).get("corpus_key") == key:
            return out_dir
        raise ArtifactError(f"{str(out_dir)!r} exists and is not this corpus's world (another corpus or base "
                            "world, or unfinished). Choose another directory or delete it.")
    judge = ExactJudge(read_jsonl(base / FACTS_FILE))
    manifest = read_json(base / MANIFEST)
    n, stated = 0, 0
    with atomic_directory(out_dir) as tmp:
        for item in base.iterdir():
            if item.is_file() and item.name not in (CORPUS_FILE, MANIFEST, "COMPLETE", *CARD_FILES):
                shutil.copy2(item, tmp / item.name)
        with (tmp / CORPUS_FILE).open("w", encoding="utf-8") as f:
            for passage in passages(spec, tokenizer, passage_tokens):
                fact_ids = judge(passage["text"])
                stated += bool(fact_ids)
                f.write(json.dumps({**passage, "fact_ids": fact_ids, "fact_triples": []}, sort_keys=True,
                                   ensure_ascii=False) + "\n")
                n += 1
        if n == 0:
            raise CorpusError(f"the corpus ({spec.source}: {spec.name or spec.path}) has no non-empty "
                              f"{spec.text_field!r} text{' in its first ' + str(spec.max_docs) + ' rows' if spec.max_docs else ''}; "
                              "nothing was written.")
        write_manifest(tmp, {
            **manifest, "profile": f"{manifest.get('profile')}+corpus", "base_world": str(base.resolve()),
            "corpus": asdict(spec), "corpus_key": key,
            "counts": {**manifest.get("counts", {}), "documents": n, "documents_stating_a_fact": stated,
                       "facts_not_judged": judge.unjudged},
        })
    return out_dir
