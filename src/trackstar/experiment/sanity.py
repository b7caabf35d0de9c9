"""A sanity report a reviewer can run in minutes.

For a few frequent facts: each method's top proponents with their correctness;
then the mean tail-patch of gold sentences against random sentences (gold
should be clearly positive, random about zero). If these do not hold, no table
built on top of them means anything.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..evaluation.tail_patch import tail_patch
from ..retrieval import get_retriever, retrieve

DEFAULT_METHODS = ("bm25", "dense", "grad_cosine", "trackstar")


def sanity_report(
    world,
    checkpoint,
    methods: Sequence[str] = DEFAULT_METHODS,
    n_facts: int = 4,
    top: int = 3,
    n_random: int = 3,
    d: int = 4096,
    seed: int = 0,
    work_dir=None,
    progress: bool = False,
) -> str:
    facts = world.facts_by_id
    sentences = {s["sentence_id"]: s for s in world.sentences}
    frequent = [q for q in world.queries if q["c4_frequency_bucket"] == 5 and q["has_trex_sentence"]]
    frequent.sort(key=lambda q: -q["c4_frequency"])
    shown = frequent[:n_facts]
    lines = [f"Sanity report: {len(shown)} frequent facts (bucket 5), top {top} closed-set proponents per method", ""]

    retrieved = {}
    for method in methods:
        options = {"d": d} if get_retriever(method).family == "gradient" else None
        records, _ = retrieve(method, world, "closed", queries=shown, k=10, checkpoint=checkpoint, options=options, work_dir=work_dir)
        retrieved[method] = {r["example_id"]: r for r in records}
    for q in shown:
        lines.append(f"{q['prompt']} -> {q['target']}   (c4_frequency={q['c4_frequency']})")
        for method in methods:
            r = retrieved[method][q["example_id"]]
            lines.append(f"  {method}:")
            for text, ok, score in list(zip(r["proponents"], r["proponent_correct"], r["proponent_scores"], strict=True))[:top]:
                lines.append(f"    [{'x' if ok else ' '}] {score:+.3f}  {text}")
        lines.append("")

    rng = random.Random(seed)
    patched = [q for q in world.queries if q["has_trex_sentence"]]
    gold = {q["example_id"]: [(sid, sentences[sid]["text"]) for sid in facts[q["fact_id"]]["trex_sentences"][:1]] for q in patched}
    rand = {q["example_id"]: [(s["sentence_id"], s["text"]) for s in rng.sample(world.sentences, n_random)] for q in patched}
    g = tail_patch(checkpoint, patched, gold, progress=progress)
    r = tail_patch(checkpoint, patched, rand, progress=progress)
    lines += [
        f"Tail-patch over {len(patched)} queries (one optimizer step at the final learning rate):",
        f"  gold sentence:    {g['delta_pp'].mean():+.3f} pp  (log-prob {g['delta_logprob'].mean():+.4f}, positive for {100 * (g['delta_pp'] > 0).mean():.0f}% of queries)",
        f"  random sentences: {r['delta_pp'].mean():+.3f} pp  (log-prob {r['delta_logprob'].mean():+.4f}, positive for {100 * (r['delta_pp'] > 0).mean():.0f}% of pairs)",
    ]
    return "\n".join(lines)
