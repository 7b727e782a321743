"""The two benchmark tasks: where prompts come from, how responses get gold, which pairs.

- CSG (controlled sentiment generation): a fortune's first words are the prompt, the rest of
  it is the real continuation, the policy continues the text; gold = VADER compound.
- KA (knowledge answer): "what does <word> mean?" for a monosemous WordNet word; the true
  answer is its gloss; gold of any answer = token-F1 against that gloss. Data v2 adds, per
  word, the answers only knowledge can rank: the glosses of its co-hyponyms and hypernym.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from bench.datagen import gold, sources
from bench.datagen.generate import SamplingParams

CSG_PROMPT_WORDS = 8
CSG_MAX_CONTINUATION_WORDS = 30
KA_DISTRACTORS = 2
KA_SIBLINGS = 3  # sibling glosses among a word's v2 candidates (at most)
KA_MIN_SIBLINGS = 2  # a word with fewer usable co-hyponyms is not a v2 prompt


@dataclass(frozen=True)
class Entry:
    """One prompt's source material: the prompt and the reference (true) response."""

    prompt: str
    reference: str
    source: str  # where it came from, for the datasheet and for debugging


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    default_domains: tuple[str, ...]
    default_heldout: tuple[str, ...]
    near_tie: float  # gold gaps below this are ties: no pair
    params: SamplingParams
    candidates: Callable[[], dict[str, list[Entry]]]
    gold: Callable[[str, Entry], float]
    gold_name: str
    extra_pairs: Callable[[Entry, list[Entry], random.Random, float], list[tuple[str, float, str]]] = field(
        default=lambda entry, pool, rng, near_tie: []
    )


# ----------------------------------------------------------------------------- CSG
@lru_cache(maxsize=1)
def csg_candidates() -> dict[str, list[Entry]]:
    min_words = CSG_PROMPT_WORDS + 4
    found: dict[str, list[Entry]] = {}
    for category in sources.fortune_categories():
        entries = []
        for index, text in enumerate(sources.read_fortunes(category)):
            if not sources.is_prose(text, min_words, 60):
                continue
            tokens = sources.words(text)
            entries.append(
                Entry(
                    prompt=" ".join(tokens[:CSG_PROMPT_WORDS]),
                    reference=" ".join(
                        tokens[CSG_PROMPT_WORDS : CSG_PROMPT_WORDS + CSG_MAX_CONTINUATION_WORDS]
                    ),
                    source=f"fortunes/{category}#{index}",
                )
            )
        if entries:
            found[category] = entries
    return found


def csg_gold(response: str, entry: Entry) -> float:
    return gold.sentiment(response)


CSG = Task(
    name="csg",
    title="Controlled sentiment generation",
    default_domains=(
        "art", "computers", "cookie", "definitions", "education", "humorists", "kids", "law",
        "literature", "men-women", "people", "politics", "science", "songs-poems", "wisdom",
        "work", "food", "love", "medicine", "sports",
    ),
    default_heldout=("food", "love", "medicine", "sports"),
    near_tie=0.1,
    params=SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, chat=False),
    candidates=csg_candidates,
    gold=csg_gold,
    gold_name="VADER compound sentiment of the response, in [-1, 1]",
)


# ----------------------------------------------------------------------------- KA
def ka_question(word: str, lexname: str) -> str:
    phrase = f"to {word}" if lexname.startswith("verb.") else word
    return f'What does "{phrase}" mean?'


@lru_cache(maxsize=1)
def ka_candidates() -> dict[str, list[Entry]]:
    return {
        lexname: [
            Entry(
                prompt=ka_question(sense.word, lexname),
                reference=sense.gloss,
                source=f"wordnet/{sense.lexname}/{sense.offset}",
            )
            for sense in senses
        ]
        for lexname, senses in sorted(sources.read_wordnet_senses().items())
    }


def ka_gold(response: str, entry: Entry) -> float:
    return gold.token_f1(response, entry.reference)


def ka_distractors(
    entry: Entry, pool: list[Entry], rng: random.Random, near_tie: float
) -> list[tuple[str, float, str]]:
    """Glosses of other words of the same domain: fluent, on-topic, and wrong."""
    picked: list[tuple[str, float, str]] = []
    for other in rng.sample(pool, min(len(pool), 8 * KA_DISTRACTORS)):
        if other.reference == entry.reference:
            continue
        score = ka_gold(other.reference, entry)
        if score <= 1.0 - near_tie:
            picked.append((other.reference, score, "distractor"))
        if len(picked) == KA_DISTRACTORS:
            break
    return picked


@lru_cache(maxsize=1)
def wordnet_graph() -> sources.WordNetGraph:
    return sources.read_wordnet_graph()


def ka_synset_key(entry: Entry) -> str:
    """The synset a KA entry asks about, from its ``wordnet/{lexname}/{offset}`` source."""
    _, lexname, offset = entry.source.split("/")
    return sources.synset_key(lexname.split(".")[0], offset)


def ka_relatives(entry: Entry) -> tuple[str, list[str]] | None:
    """(the hypernym's gloss, the co-hyponyms' glosses in synset order) of a KA word, or None
    when it has no hypernym or fewer than KA_MIN_SIBLINGS co-hyponyms whose glosses are long
    enough (sources.MIN_GLOSS_WORDS) and differ from the true and the hypernym's gloss."""
    graph = wordnet_graph()
    synset = graph.synsets[ka_synset_key(entry)]
    if not synset.hypernyms:
        return None
    hypernym = graph.synsets[synset.hypernyms[0]].gloss
    if not hypernym or hypernym == entry.reference:
        return None
    siblings: list[str] = []
    seen = {entry.reference, hypernym}
    for sibling in graph.siblings(synset.key):
        gloss = sibling.gloss
        if len(sources.words(gloss)) >= sources.MIN_GLOSS_WORDS and gloss not in seen:
            seen.add(gloss)
            siblings.append(gloss)
    if len(siblings) < KA_MIN_SIBLINGS:
        return None
    return hypernym, siblings


def ka_knowledge_candidates(entry: Entry, rng: random.Random) -> list[tuple[str, str]]:
    """(text, kind) answers that only knowledge of the word ranks: its true gloss ("gloss"),
    up to KA_SIBLINGS glosses of co-hyponyms drawn by ``rng`` ("sibling": same kind of thing,
    other thing) and its hypernym's gloss ("hypernym": right kind, too general)."""
    relatives = ka_relatives(entry)
    if relatives is None:
        raise ValueError(f"{entry.source}: no hypernym or too few co-hyponyms")
    hypernym, siblings = relatives
    picked = rng.sample(siblings, min(KA_SIBLINGS, len(siblings)))
    return [(entry.reference, "gloss"), *((g, "sibling") for g in picked), (hypernym, "hypernym")]


KA = Task(
    name="ka",
    title="Knowledge answer",
    default_domains=(
        "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.cognition",
        "noun.communication", "noun.event", "noun.group", "noun.location", "noun.person",
        "noun.state", "noun.substance", "noun.time", "verb.change", "verb.communication",
        "verb.contact", "noun.food", "noun.plant", "noun.body", "verb.motion",
    ),
    default_heldout=("noun.food", "noun.plant", "noun.body", "verb.motion"),
    near_tie=0.1,
    params=SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.95, chat=True),
    candidates=ka_candidates,
    gold=ka_gold,
    gold_name="token-F1 of the answer against the word's WordNet gloss, in [0, 1]",
    extra_pairs=ka_distractors,
)

TASKS = {task.name: task for task in (CSG, KA)}
