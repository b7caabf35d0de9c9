"""Which facts a text states: the embedded world's exact stand-in for an entailment model.

For real C4 the paper labels a passage correct when an AIS entailment model
says it entails the fact. The embedded world knows every phrasing it uses, so
it can decide exactly: a fact is stated by a sentence that contains one of its
relation's phrasings (the templated style's statements and the natural
style's phrasings alike) filled with the fact's subject and object, each by
its name or one of its aliases (``entity0_alias`` / ``entity1_alias``).
Matching is case-insensitive and ignores the final period, so a statement
joined into a longer sentence ("..., and the currency of X is the Y.") still
counts. A sentence that names its subject by a pronoun or a short form ("She
grew up in Y") is not credited here: resolving it needs the abstract it
belongs to, which the world's own annotations carry.
"""

from __future__ import annotations

import re

from .relations import NATURAL_STATEMENTS, RELATIONS, natural_render

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def entity_names(fact: dict, side: int) -> list[str]:
    """The names of ``fact``'s subject (side 0) or object (side 1): its name, then its aliases."""
    name = fact[f"entity{side}"]
    return list(dict.fromkeys([name, *fact.get(f"entity{side}_alias", ())]))


def statement_patterns(fact: dict) -> list[str]:
    """Lower-cased phrasings that state ``fact`` (a ``trex_facts.jsonl`` record)."""
    relation = fact["relation"]
    templates = RELATIONS[relation].statements + NATURAL_STATEMENTS.get(relation, ())
    return sorted({natural_render(t, s, o).rstrip(".").lower()
                   for t in templates for s in entity_names(fact, 0) for o in entity_names(fact, 1)})


def states_fact(text: str, fact: dict) -> bool:
    """True when some sentence of ``text`` states ``fact``."""
    patterns = statement_patterns(fact)
    return any(contains_phrase(s.lower(), p) for s in split_sentences(text) for p in patterns)


def contains_phrase(sentence: str, phrase: str) -> bool:
    if phrase not in sentence:
        return False
    # Word boundaries keep "Niger" from matching inside "Nigeria".
    return re.search(r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])", sentence) is not None
