"""The world card: how hard a fact world is, measured from its files.

Written beside every world (``world_card.json`` and ``world_card.md``) and
printed by ``trackstar world``. Every figure is recomputed from the world's
release-schema files, never taken from the generator:

- facts, closed-set sentences, documents, queries;
- gold (annotated) sentences per fact, as a histogram and by frequency bucket;
- the share of gold sentences that contain the subject's name, and that
  contain a content word of one of the fact's three prompts;
- distractors per fact (natural worlds mark them: ``kind``);
- closed-set BM25 MRR and recall@10 over the queries with a gold sentence,
  exactly as Table 1's BM25 row computes them (k = 10, Lucene's k1 and b);
- for a generated natural world neither too big nor too small (``KNOB_EFFECT_MAX_FACTS``,
  ``KNOB_EFFECT_MIN_QUERIES``: the tiny world):
  BM25 MRR with each knob turned off alone, and with the templated style
  (means over a few world seeds), so the card says how each knob moves it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text, read_json
from ..retrieval.bm25 import bm25_topk
from ..retrieval.records import Corpus, query_text, text_records
from ..world import load_world
from ..world.annotate import contains_phrase
from ..world.generate import generate_world
from ..world.profiles import PROFILES, get_profile, natural_knobs
from ..world.release import frequency_bucket
from ..world.store import CARD_FILES
from .metrics import score_retrievals

CARD_JSON, CARD_MD = CARD_FILES
CARD_VERSION = 1
#: Knob effects regenerate the world once per knob: done for worlds up to this many facts.
KNOB_EFFECT_MAX_FACTS = 2_000
KNOB_EFFECT_MIN_QUERIES = 50
KNOB_EFFECT_SEEDS = 3
#: Gold sentences per fact, as the histogram's bins (the last is open).
GOLD_BINS = (0, 1, 2, 3, 4, 8)

#: Words no prompt counts as content (function words and the verbs every relation uses).
_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been has have had its it his her their "
    "this that these those as into".split()
)
#: Each knob turned off alone (what "off" means for it), for the knob-effect table.
KNOB_OFF = {
    "alias_share": {"alias_share": 0.0},
    "short_form_share": {"short_form_share": 0.0},
    "pronoun_share": {"pronoun_share": 0.0},
    "relative_distractors": {"relative_distractors": 0.0},
    "namesake_distractors": {"namesake_distractors": 0.0},
    "same_object_distractors": {"same_object_distractors": 0.0},
    "gold_tail": {"gold_tail": 0.0, "max_gold": 3},
    "phrasings": {"phrasings": 1},
    "annotation_noise": {"annotation_noise": 0.0},
}


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in _STOPWORDS}


def bm25_closed_set(sentences: list[dict], queries: list[dict]) -> dict:
    """Closed-set BM25 MRR and recall@10 over the queries with a gold sentence (Table 1's BM25 row)."""
    corpus = Corpus("closed", [s["sentence_id"] for s in sentences], [s["text"] for s in sentences],
                    [s["fact_ids"] for s in sentences])
    rows, scores = bm25_topk(corpus.texts, [query_text(q) for q in queries], min(10, len(corpus)))
    per_query = score_retrievals(text_records(queries, corpus, rows, scores))
    scored = per_query[per_query["has_trex_sentence"]]
    return {"bm25_mrr": round(float(scored["mrr"].mean()), 4) if len(scored) else None,
            "bm25_recall@10": round(float(scored["recall@10"].mean()), 4) if len(scored) else None,
            "queries_scored": int(len(scored))}


def measure(facts: list[dict], sentences: list[dict], documents: int, queries: list[dict]) -> dict:
    """The card's figures from release-schema records (see the module doc)."""
    by_id = {f["fact_id"]: f for f in facts}
    # A prompt's content words, less the subject's own name.
    prompt_words = {f["fact_id"]: set().union(*(content_words(f[p]) for p in ("prompt0", "prompt1", "prompt2")))
                    - content_words(f["entity0"]) for f in facts}
    gold_count: Counter = Counter()
    with_name = with_prompt_word = n_gold = 0
    for s in sentences:
        for fid in s.get("fact_ids", ()):
            if fid not in by_id:
                continue
            f = by_id[fid]
            gold_count[fid] += 1
            n_gold += 1
            with_name += contains_phrase(s["text"].lower(), f["entity0"].lower())
            with_prompt_word += bool(prompt_words[fid] & content_words(s["text"]))
    hist = Counter()
    for f in facts:
        n = gold_count[f["fact_id"]]
        hist[next(b for b in reversed(GOLD_BINS) if n >= b)] += 1
    labels = [f"{b}" if i + 1 < len(GOLD_BINS) and GOLD_BINS[i + 1] == b + 1 else
              (f"{b}-{GOLD_BINS[i + 1] - 1}" if i + 1 < len(GOLD_BINS) else f"{b}+") for i, b in enumerate(GOLD_BINS)]
    by_bucket: dict[int, list[int]] = {}
    for f in facts:
        bucket = f.get("c4_frequency_bucket")
        bucket = bucket if isinstance(bucket, int) else frequency_bucket(f["c4_frequency"])
        by_bucket.setdefault(bucket, []).append(gold_count[f["fact_id"]])
    kinds = Counter(s.get("kind", "unmarked") for s in sentences)
    distractors = {k: kinds.get(k, 0) for k in ("relative", "namesake", "same_object")}
    forms = Counter(s["subject_form"] for s in sentences if s.get("kind") == "gold" and "subject_form" in s)
    return {
        "facts": len(facts), "sentences": len(sentences), "documents": documents, "queries": len(queries),
        "gold_sentences": n_gold,
        "gold_per_fact_histogram": {label: hist.get(b, 0) for label, b in zip(labels, GOLD_BINS)},
        "gold_per_fact_mean_by_bucket": {str(b): round(sum(v) / len(v), 3) for b, v in sorted(by_bucket.items())},
        "share_gold_with_subject_name": round(with_name / n_gold, 4) if n_gold else None,
        "share_gold_with_prompt_content_word": round(with_prompt_word / n_gold, 4) if n_gold else None,
        "gold_subject_forms": dict(sorted(forms.items())),
        "distractors": distractors,
        "distractors_per_fact": round(sum(distractors.values()) / len(facts), 4) if facts else 0.0,
        **bm25_closed_set(sentences, queries),
    }


def knob_effects(profile: str, seed: int, knobs: dict) -> dict:
    """BM25 closed-set MRR with each knob off alone, with all of them at once, and in the
    templated style, each the mean over the worlds of ``KNOB_EFFECT_SEEDS`` seeds from
    ``seed`` (a knob changes every later random draw, so one seed's difference mixes the
    knob's effect with another draw of the world)."""
    prof = get_profile(profile)
    base = natural_knobs(knobs)

    def mrr(style: str, k) -> float:
        values = []
        for s in range(seed, seed + KNOB_EFFECT_SEEDS):
            w = generate_world(prof, s, style, k)
            values.append(bm25_closed_set(w.sentences, w.queries)["bm25_mrr"])
        return round(sum(values) / len(values), 4)

    effects = {"as built": mrr("natural", base)}
    everything_off: dict = {}
    for knob, off in KNOB_OFF.items():
        if all(getattr(base, k) == v for k, v in off.items()):
            continue  # already off
        everything_off.update(off)
        effects[f"{knob} off"] = mrr("natural", replace(base, **off))
    if everything_off:
        effects["all knobs off (natural phrasings only)"] = mrr("natural", replace(base, **everything_off))
    effects["templated style"] = mrr("templated", None)
    return effects


def world_card(world_dir: str | os.PathLike) -> dict:
    """The card of the world at ``world_dir`` (computed now, from its files)."""
    world = load_world(world_dir)
    m = world.manifest
    card = {"card_version": CARD_VERSION, "world": str(Path(world_dir).name), "content_hash": m["content_hash"],
            "profile": m.get("profile"), "seed": m.get("seed"), "style": m.get("style", "templated"),
            "knobs": m.get("knobs"),
            **measure(world.facts, world.sentences, len(world.corpus), world.queries)}
    if card["style"] == "natural" and card["knobs"] is not None and m.get("profile") in PROFILES:
        if card["facts"] > KNOB_EFFECT_MAX_FACTS:
            card["knob_effects_bm25_mrr"] = (f"not computed for worlds over {KNOB_EFFECT_MAX_FACTS:,} facts "
                                             "(it regenerates the world once per knob): see the tiny world's card")
        elif card["queries_scored"] < KNOB_EFFECT_MIN_QUERIES:
            card["knob_effects_bm25_mrr"] = (f"not computed for worlds with fewer than {KNOB_EFFECT_MIN_QUERIES} "
                                             "queries (their MRR differences would be noise): see the tiny world's card")
        else:
            card["knob_effects_bm25_mrr"] = knob_effects(m["profile"], m["seed"], card["knobs"])
    return card


def write_card(world_dir: str | os.PathLike) -> dict:
    """Write (or reuse, when it describes this content) the card beside the world; return it."""
    world_dir = Path(world_dir)
    path = world_dir / CARD_JSON
    content_hash = read_json(world_dir / "manifest.json")["content_hash"]
    if path.is_file():
        try:
            card = read_json(path)
        except Exception:  # a damaged card is recomputed, never trusted
            card = None
        if card and card.get("content_hash") == content_hash and card.get("card_version") == CARD_VERSION:
            return card
    card = world_card(world_dir)
    atomic_write_json(path, card)
    atomic_write_text(world_dir / CARD_MD, card_markdown(card))
    return card


def card_markdown(card: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"# World card: {card['world']}",
        "",
        f"Profile {card['profile']}, seed {card['seed']}, style **{card['style']}**.",
        "",
        "| what | value |", "|---|---:|",
        f"| facts | {card['facts']:,} |", f"| closed-set sentences | {card['sentences']:,} |",
        f"| documents (open set) | {card['documents']:,} |", f"| queries | {card['queries']:,} |",
        f"| gold sentences | {card['gold_sentences']:,} |",
        f"| gold sentences containing the subject's name | {pct(card['share_gold_with_subject_name'])} |",
        f"| gold sentences containing a content word of a prompt | {pct(card['share_gold_with_prompt_content_word'])} |",
        f"| distractors per fact | {card['distractors_per_fact']:.2f} |",
        f"| closed-set BM25 MRR ({card['queries_scored']} queries with a gold sentence) | "
        f"{'n/a' if card['bm25_mrr'] is None else format(card['bm25_mrr'], '.4f')} |",  # as stored: rounded once
        f"| closed-set BM25 recall@10 | {'n/a' if card['bm25_recall@10'] is None else format(card['bm25_recall@10'], '.4f')} |",
        "", "Gold sentences per fact: " + ", ".join(f"{k}: {v}" for k, v in card["gold_per_fact_histogram"].items())
        + " facts.", "",
        "Mean gold sentences per fact by frequency bucket: "
        + ", ".join(f"{k}: {v}" for k, v in card["gold_per_fact_mean_by_bucket"].items()) + ".",
    ]
    if card["gold_subject_forms"]:
        lines += ["", "How gold sentences name their subject: "
                  + ", ".join(f"{k} {v}" for k, v in card["gold_subject_forms"].items()) + "."]
    if any(card["distractors"].values()):
        lines += ["", "Distractors: " + ", ".join(f"{k} {v}" for k, v in card["distractors"].items()) + "."]
    if card.get("knobs"):
        lines += ["", "Knobs: " + ", ".join(f"{k}={v}" for k, v in card["knobs"].items()) + "."]
    effects = card.get("knob_effects_bm25_mrr")
    if isinstance(effects, dict):
        lines += ["", f"How each knob moves closed-set BM25 MRR: the world regenerated with that knob off alone, "
                  f"each value the mean over {KNOB_EFFECT_SEEDS} world seeds from this one:", "",
                  "| setting | BM25 MRR |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in effects.items()]
    elif effects:
        lines += ["", f"Knob effects: {effects}."]
    return "\n".join(lines) + "\n"
