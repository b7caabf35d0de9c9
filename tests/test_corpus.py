"""Real corpora through `datasets` (local fixtures only: a JSONL file, a parquet file, a
save_to_disk directory) as the open set and as our models' pretraining corpus."""

import json

import pytest

from trackstar.world import load_world
from trackstar.world.corpus import CorpusError, CorpusSpec, ExactJudge, corpus_world, passages


@pytest.fixture(scope="module")
def documents(micro_world):
    """The micro world's own documents as a plain corpus (text only), plus noise."""
    return [{"text": d["text"], "url": f"https://example.org/{i}"} for i, d in enumerate(micro_world.corpus)]


@pytest.fixture(scope="module")
def files(documents, tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("corpora")
    with (root / "docs.jsonl").open("w") as f:
        for d in documents:
            f.write(json.dumps(d) + "\n")
    data = datasets.Dataset.from_list(documents)
    data.to_parquet(str(root / "docs.parquet"))
    data.save_to_disk(str(root / "saved"))
    return root


def test_every_source_gives_the_same_passages_with_stable_ids(files, documents):
    specs = [CorpusSpec("jsonl", str(files / "docs.jsonl"), passage_words=12),
             CorpusSpec("jsonl", str(files / "*.jsonl"), passage_words=12, streaming=True),
             CorpusSpec("parquet", str(files / "docs.parquet"), passage_words=12),
             CorpusSpec("hf", str(files / "saved"), passage_words=12, streaming=True)]
    results = [list(passages(s)) for s in specs]
    assert all(r == results[0] for r in results[1:])
    first = documents[0]["text"].split()
    assert results[0][0] == {"doc_id": "0-0", "text": " ".join(first[:12])}
    assert all(len(p["text"].split()) <= 12 for p in results[0])
    capped = list(passages(CorpusSpec("jsonl", str(files / "docs.jsonl"), max_docs=3)))
    assert {p["doc_id"].split("-")[0] for p in capped} == {"0", "1", "2"}


def test_bad_corpora_name_the_problem(files, tmp_path):
    with pytest.raises(CorpusError, match=r"corpus.text_field='body'.*fields are \['text', 'url'\]"):
        list(passages(CorpusSpec("jsonl", str(files / "docs.jsonl"), text_field="body")))
    with pytest.raises(CorpusError, match="no such file"):
        CorpusSpec("parquet", str(tmp_path / "none.parquet")).check_paths()
    lines = (files / "docs.jsonl").read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join([*lines[:2], '{"text": "cut off', *lines[2:]]) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl line 3: not valid JSON .*one JSON document per line"):
        list(passages(CorpusSpec("jsonl", str(tmp_path / "bad.jsonl"))))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"latin1.jsonl line 1: byte 0xe9 is not UTF-8"):
        list(passages(CorpusSpec("jsonl", str(tmp_path / "latin1.jsonl"))))
    with pytest.raises(CorpusError, match="needs corpus.name"):
        CorpusSpec("hf")
    with pytest.raises(CorpusError, match="use one of"):
        CorpusSpec("csv", "x")


def test_the_exact_judge_agrees_with_the_worlds_annotations(micro_world):
    judge = ExactJudge(micro_world.facts)
    assert judge.unjudged == 0
    for doc in micro_world.corpus:
        assert judge(doc["text"]) == sorted(doc["fact_ids"]), doc["doc_id"]
    for sentence in micro_world.sentences:
        assert judge(sentence["text"]) == sorted(sentence["fact_ids"]), sentence["sentence_id"]


def test_a_corpus_world_is_judged_and_written_once(micro_world, files, tmp_path):
    spec = CorpusSpec("jsonl", str(files / "docs.jsonl"))  # 96 words: every micro document is one passage
    world = load_world(corpus_world(micro_world.path, spec, tmp_path / "w"))
    assert [d["fact_ids"] for d in world.corpus] == [sorted(d["fact_ids"]) for d in micro_world.corpus]
    assert world.queries == micro_world.queries and world.facts == micro_world.facts
    assert corpus_world(micro_world.path, spec, tmp_path / "w") == world.path  # reused
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(CorpusError, match="no non-empty 'text' text"):
        corpus_world(micro_world.path, CorpusSpec("jsonl", str(empty)), tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_a_sweep_cell_and_pretraining_take_the_corpus(files, tmp_path):
    from trackstar.cli import main
    from trackstar.experiment import ConfigError, compose_config, run_cell, validate

    # The corpus files hold the templated micro world's documents.
    common = ["world=micro", "world.style=templated", "model=micro", "eval=open", "method=bm25", "progress=false", "logger=none",
              f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}",
              "corpus.source=parquet", f"corpus.path={files / 'docs.parquet'}", "corpus.passage_words=40"]
    record = run_cell(compose_config(common))
    assert record.status == "finished" and "+corpus-" in record.artifacts["world"]["path"]
    assert record.metrics["mrr"]["mean"] > 0.3
    # Unchunked, the corpus is the world's own open set again: the judge's labels give the same metrics.
    whole = run_cell(compose_config([*common[:-1], "corpus.passage_words=1000"]))
    plain = run_cell(compose_config(common[:-3]))
    assert {m: whole.metrics[m]["mean"] for m in ("mrr", "recall@10")} == \
        {m: plain.metrics[m]["mean"] for m in ("mrr", "recall@10")}
    with pytest.raises(ConfigError, match="no such file"):
        validate(compose_config([*common[:-2], f"corpus.path={tmp_path / 'missing.parquet'}"]))
    main(["--artifacts", str(tmp_path / "art"), "pretrain", "--world", str(tmp_path / "art" / "worlds" / "micro-s0"),
          "--size", "micro", "--corpus-source", "parquet", "--corpus-path", str(files / "docs.parquet"),
          "--passage-words", "40"])
    assert list((tmp_path / "art" / "models").glob("micro-s0+corpus-*/gpt2-micro-*/pretrain.json"))


def test_passages_are_bounded_even_without_whitespace(tmp_path):
    """A 2 MB document without spaces was one passage (then minutes of silent tokenizer training)."""
    from trackstar.world.corpus import MAX_WORD_CHARS

    blob = "x" * 2_000_000
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": f"A short start. {blob} the end"}) + "\n")
    spec = CorpusSpec("jsonl", str(tmp_path / "docs.jsonl"), passage_words=96)
    out = list(passages(spec))
    assert max(len(p["text"]) for p in out) <= 96 * (MAX_WORD_CHARS + 1)
    assert "".join(p["text"].replace(" ", "") for p in out) == f"Ashortstart.{blob}theend"  # nothing lost
    assert len(out) == -(-(3 + -(-len(blob) // MAX_WORD_CHARS) + 2) // 96)
