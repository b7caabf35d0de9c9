"""Which facts a text states: the embedded world's exact stand-in for an entailment model.

For real C4 the paper labels a passage correct when an AIS entailment model
says it entails the fact. The embedded world knows every phrasing it uses, so
it can decide exactly: a fact is stated by a sentence that contains one of its
relation's statement templates filled with its subject and object. Matching is
case-insensitive and ignores the final period, so a statement joined into a
longer sentence ("..., and the currency of X is the Y.") still counts.
"""

from __future__ import annotations

import re

from .relations import RELATIONS, render

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def statement_patterns(fact: dict) -> list[str]:
    """Lower-cased phrasings that state ``fact`` (a ``trex_facts.jsonl`` record)."""
    return [
        render(t, fact["entity0"], fact["entity1"]).rstrip(".").lower()
        for t in RELATIONS[fact["relation"]].statements
    ]


def states_fact(text: str, fact: dict) -> bool:
    """True when some sentence of ``text`` states ``fact``."""
    patterns = statement_patterns(fact)
    return any(_contains_phrase(s.lower(), p) for s in split_sentences(text) for p in patterns)


def _contains_phrase(sentence: str, phrase: str) -> bool:
    if phrase not in sentence:
        return False
    # Word boundaries keep "Niger" from matching inside "Nigeria".
    return re.search(r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])", sentence) is not None
