"""The natural world style (``world.style=natural``): the same facts, stated as T-REx states them.

The templated style states each fact in its query's own words, so BM25 finds
the gold sentence almost always. Here every source of T-REx's difficulty is a
knob (:class:`~.profiles.NaturalKnobs`):

- phrasing: each relation's natural phrasings (:data:`~.relations.NATURAL_STATEMENTS`),
  none containing a prompt;
- surface forms: aliases (a middle name, an ISO code, a city's other name, an
  acronym), short forms (a surname, "the city") and pronouns that refer back
  within an abstract, annotated with the fact as T-REx does through coreference;
- distractors: sentences that share a fact's subject and relation words but
  state another entity's fact ("X's brother was born in Z"), namesakes (a
  person of the same surname) and someone else with the same object;
- frequency: a heavy tail of gold sentences per fact;
- annotation noise: stating sentences left unannotated (off by default).

The closed set is grouped into abstracts about one entity, opened by a
sentence that names it. Every sentence record says what it is (``kind``:
context, gold, relative, namesake or same_object; ``subject_form`` for golds;
``distractor_of`` for distractors), so the world card and the tests recompute
everything from the files. The open set (the pretraining corpus) uses the same
phrasings, names and aliases (no pronouns: a document mixes subjects), plus a
share of statements in the query's wording (``open_prompt_share``). Queries are
drawn exactly as :func:`~.release.sample_queries` draws them from a release, so
``trackstar world --from-release`` on a natural world's files rebuilds its
facts, closed set and queries.
"""

from __future__ import annotations

import re
import random
from collections import defaultdict

from faker import Faker
from faker.providers.person.en_US import Provider as PersonNames

from .generate import CONTEXT_TEMPLATES, Entity, Fact, World, _open_set, fact_record, geonames, world_facts
from .profiles import NaturalKnobs, WorldProfile
from .relations import NATURAL_STATEMENTS, RELATIONS, RELATIVE_PHRASES, SHORT_FORMS, natural_render, render_context
from .release import sample_queries

#: Bumped whenever the same (profile, seed, knobs) would give another natural world.
NATURAL_VERSION = 1

#: Sentence kinds of the natural closed set.
GOLD, CONTEXT, RELATIVE, NAMESAKE, SAME_OBJECT = "gold", "context", "relative", "namesake", "same_object"
DISTRACTOR_KINDS = (RELATIVE, NAMESAKE, SAME_OBJECT)
#: How a gold sentence names its subject.
SUBJECT_FORMS = ("name", "alias", "short", "pronoun")

_PROPER = re.compile(r"[A-Z][a-z]+(?:[ -][A-Z][a-z]+)*")


class _Forms:
    """An entity's surface forms."""

    def __init__(self, name: str, aliases: list[str], short: str | None, pronoun: str | None):
        self.name, self.aliases, self.short, self.pronoun = name, aliases, short, pronoun


def _pronoun(first_name: str) -> str:
    female = PersonNames.first_names_female.get(first_name, 0.0)
    male = PersonNames.first_names_male.get(first_name, 0.0)
    return "She" if female >= male else "He"


def _surface_forms(entities: list[Entity], names, fake: Faker, rng: random.Random) -> dict[str, _Forms]:
    """Every entity's forms; aliases are unique across the world's names, so a name still
    says which entity it is (short forms and pronouns need their abstract)."""
    cities, all_countries = geonames()
    countries = {c["name"]: c for c in all_countries.values()}
    currency_codes = {}
    for c in sorted(countries.values(), key=lambda c: c["iso"]):
        currency_codes.setdefault(c["currencyname"], c["currencycode"])

    forms = {}
    for e in entities:
        aliases: list[str] = []
        short, pronoun = SHORT_FORMS.get(e.type), "It"
        if e.type == "person":
            first, last = e.name.split(" ", 1)[0], e.name.rsplit(" ", 1)[-1]
            pronoun, short = _pronoun(first), last
            make_middle = fake.first_name_female if pronoun == "She" else fake.first_name_male
            for _ in range(5):
                alias = f"{first} {make_middle()} {last}"
                if names.take(alias):
                    aliases.append(alias)
                    break
        elif e.type == "country" and e.name in countries:
            aliases += [countries[e.name]["iso3"]] if names.take(countries[e.name]["iso3"]) else []
        elif e.type == "currency" and currency_codes.get(e.name):
            aliases += [currency_codes[e.name]] if names.take(currency_codes[e.name]) else []
        elif e.type == "city":
            city = cities.get(e.uri.rstrip("/").rsplit("/", 1)[-1])
            others = sorted({a for a in (city or {}).get("alternatenames", ()) if _PROPER.fullmatch(a)
                             and a.lower() != e.name.lower()}, key=lambda a: (len(a), a))
            aliases += next(([a] for a in others if names.take(a)), [])
        elif e.type == "university":
            acronym = "".join(w[0] for w in e.name.split() if w[:1].isupper())
            aliases += [acronym] if len(acronym) >= 2 and names.take(acronym) else []
        elif e.type in ("continent", "occupation"):
            pronoun = None
        if e.type == "occupation":
            short = None
        forms[e.uri] = _Forms(e.name, aliases, short, pronoun)
    return forms


def _count(mean: float, rng: random.Random) -> int:
    """An integer with the given mean: its floor, plus one with the fractional part's probability."""
    whole = int(mean)
    return whole + (rng.random() < mean - whole)


class _Writer:
    """Draws surface forms and phrasings for one world."""

    def __init__(self, knobs: NaturalKnobs, forms: dict[str, _Forms], rng: random.Random):
        self.knobs, self.forms, self.rng = knobs, forms, rng
        self.phrasings = {pid: NATURAL_STATEMENTS[pid][:knobs.phrasings] for pid in NATURAL_STATEMENTS}

    def object_form(self, e: Entity) -> str:
        aliases = self.forms[e.uri].aliases
        return self.rng.choice(aliases) if aliases and self.rng.random() < self.knobs.alias_share else e.name

    def subject_form(self, e: Entity, template: str, later: bool) -> tuple[str, str]:
        """(the text, its kind) of a subject mention; ``later``: after its abstract's opening."""
        f, k, r = self.forms[e.uri], self.knobs, self.rng.random()
        if later and f.pronoun and template.startswith("{s} ") and r < k.pronoun_share:
            return f.pronoun, "pronoun"
        if later and f.short and r < k.pronoun_share + k.short_form_share:
            return f.short, "short"
        if f.aliases and r < k.pronoun_share + k.short_form_share + k.alias_share:
            return self.rng.choice(f.aliases), "alias"
        return e.name, "name"

    def gold(self, f: Fact) -> tuple[str, str]:
        template = self.rng.choice(self.phrasings[f.pid])
        subject, kind = self.subject_form(f.subject, template, later=True)
        return natural_render(template, subject, self.object_form(f.obj)), kind

    def about(self, subject: str, f: Fact, obj: Entity) -> str:
        """A sentence in ``f``'s relation's words (a prompt or a phrasing) with another
        subject or object: what distractors say."""
        if self.rng.random() < 0.5:
            prompt = self.rng.choice(RELATIONS[f.pid].prompts)
            text = f"{prompt.format(s=subject)} {self.object_form(obj)}."
            return text[:1].upper() + text[1:]
        return natural_render(self.rng.choice(self.phrasings[f.pid]), subject, self.object_form(obj))

    def open_statement(self, f: Fact) -> str:
        """A pretraining-corpus statement: names or aliases, sometimes in the query's wording."""
        if self.rng.random() < self.knobs.open_prompt_share:
            template = self.rng.choice(RELATIONS[f.pid].statements)
        else:
            template = self.rng.choice(self.phrasings[f.pid])
        subject, _ = self.subject_form(f.subject, template, later=False)
        return natural_render(template, subject, self.object_form(f.obj))


def _fresh_person(names, fake: Faker, last: str | None = None) -> str | None:
    for _ in range(50):
        name = f"{fake.first_name()} {last or fake.last_name()}"
        if names.take(name):
            return name
    return None


def _closed_set(facts: list[Fact], profile: WorldProfile, knobs: NaturalKnobs, writer: _Writer, names,
                fake: Faker, rng: random.Random) -> list[dict]:
    by_type: dict[str, list[Entity]] = defaultdict(list)
    for e in sorted({f.obj for f in facts}, key=lambda e: e.uri):
        by_type[e.type].append(e)
    gold_weights = [n ** -knobs.gold_tail for n in range(1, knobs.max_gold + 1)]

    abstracts: dict[str, list[dict]] = defaultdict(list)  # anchor URI -> its sentences after the opening
    for f in facts:
        n_gold = 0 if rng.random() < profile.no_gold_fraction else rng.choices(range(1, knobs.max_gold + 1),
                                                                               gold_weights)[0]
        for _ in range(n_gold):
            text, form = writer.gold(f)
            annotated = not (knobs.annotation_noise and rng.random() < knobs.annotation_noise)
            abstracts[f.subject.uri].append({"text": text, "kind": GOLD, "subject_form": form,
                                             "stated": [f] if annotated else [], "states": f.fact_id})
        others = [e for e in by_type[f.obj.type] if e != f.obj]
        if not others:
            continue
        for _ in range(_count(knobs.relative_distractors, rng) if f.subject.type in RELATIVE_PHRASES else 0):
            phrase = rng.choice(RELATIVE_PHRASES[f.subject.type]).format(s=writer.object_form(f.subject))
            abstracts[f.subject.uri].append({"text": writer.about(phrase, f, rng.choice(others)), "kind": RELATIVE,
                                             "distractor_of": f.fact_id, "stated": []})
        if f.subject.type != "person":
            continue
        for kind, mean in ((NAMESAKE, knobs.namesake_distractors), (SAME_OBJECT, knobs.same_object_distractors)):
            for _ in range(_count(mean, rng)):
                person = _fresh_person(names, fake, f.subject.name.rsplit(" ", 1)[-1] if kind == NAMESAKE else None)
                if person is None:
                    continue
                obj = rng.choice(others) if kind == NAMESAKE else f.obj
                abstracts[f"world://{kind}/{person.lower().replace(' ', '-')}"].append(
                    {"text": writer.about(person, f, obj), "kind": kind, "distractor_of": f.fact_id, "stated": []})

    mentioned = {e.uri: e for f in facts for e in (f.subject, f.obj)}
    sentences: list[dict] = []
    for anchor in sorted(set(mentioned) | set(abstracts)):
        body = abstracts.get(anchor, [])
        rng.shuffle(body)
        opening = []
        if anchor in mentioned:
            e = mentioned[anchor]
            opening = [{"text": render_context(t, e.name), "kind": CONTEXT, "stated": []}
                       for t in rng.sample(CONTEXT_TEMPLATES[e.type], rng.randint(1, 2))]
        for i, draft in enumerate(opening + body):
            sid = f"S{len(sentences):06d}"
            for g in draft["stated"]:
                g.trex_sentences.append(sid)
            record = {"sentence_id": sid, "text": draft["text"], "abstract_uri": f"world://abstract/{anchor}",
                      "sent_idx_in_abst": i, "fact_triples": [g.triple for g in draft["stated"]],
                      "fact_ids": [g.fact_id for g in draft["stated"]], "kind": draft["kind"]}
            for key in ("subject_form", "distractor_of", "states"):
                if key in draft:
                    record[key] = draft[key]
            sentences.append(record)
    return sentences


def generate_natural(profile: WorldProfile, seed: int, knobs: NaturalKnobs) -> World:
    rng, fake, names, facts = world_facts(profile, seed)
    entities = sorted({e for f in facts for e in (f.subject, f.obj)}, key=lambda e: e.uri)
    forms = _surface_forms(entities, names, fake, rng)
    writer = _Writer(knobs, forms, rng)
    sentences = _closed_set(facts, profile, knobs, writer, names, fake, rng)
    distractors = [s["text"] for s in sentences if s["kind"] in DISTRACTOR_KINDS]

    def filler() -> str:
        r = rng.random()
        if distractors and r < 1 / 3:
            return rng.choice(distractors)
        if r < 2 / 3:
            e = rng.choice(entities)
            return render_context(rng.choice(CONTEXT_TEMPLATES[e.type]), e.name)
        return fake.sentence(nb_words=rng.randint(5, 10))

    corpus = _open_set(facts, entities, profile, rng, fake, state=writer.open_statement, filler=filler)
    aliases = {uri: f.aliases for uri, f in forms.items() if f.aliases}
    records = [fact_record(f, aliases) for f in facts]
    queries = sample_queries(records, {f.fact_id: len(f.trex_sentences) for f in facts}, profile.queries_per_bucket,
                             seed)
    return World(seed, profile, facts, sentences, corpus, queries, entities, style="natural", knobs=knobs,
                 aliases=aliases)
