"""Read the offline text sources: Debian ``fortunes`` categories and WordNet lexicographer files.

Only parsing lives here: which entries are usable, never how they become prompts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")

# The lexicographer file numbers of WordNet 3.0 (lexnames(5WN)); wordnet-base does not ship
# the lexnames file itself.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
POS_FILES = ("noun", "verb", "adj", "adv")


class SourceMissingError(FileNotFoundError):
    """A text source is not installed (``make install`` apt-installs it)."""


def words(text: str) -> list[str]:
    return text.split()


def fortune_categories(root: Path = FORTUNES_DIR) -> list[str]:
    if not root.is_dir():
        raise SourceMissingError(f"{root} not found: apt-get install fortunes (make install)")
    return sorted(
        p.name for p in root.iterdir() if p.is_file() and "." not in p.name
    )


def read_fortunes(category: str, root: Path = FORTUNES_DIR) -> list[str]:
    """The entries of one category, whitespace-normalised, in file order."""
    path = root / category
    if not path.is_file():
        raise SourceMissingError(f"fortune category {category!r} not found at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [" ".join(words(entry)) for entry in entries if entry.strip()]


def is_prose(entry: str, min_words: int, max_words: int) -> bool:
    """Sentences rather than ASCII art, code, tables or one-liners."""
    n = len(words(entry))
    if not min_words <= n <= max_words:
        return False
    visible = [c for c in entry if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters / len(visible) >= 0.75


@dataclass(frozen=True)
class Sense:
    """One WordNet synset, seen through a word that names only it."""

    word: str  # underscores replaced by spaces
    gloss: str  # the definition, without the quoted examples
    lexname: str
    offset: str


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet ``data.{noun,verb}`` file: what the KA tasks need of it."""

    pos: str  # "noun" or "verb"
    offset: str
    lexname: str
    lemmas: tuple[str, ...]  # as written in the file (underscores, case)
    gloss: str  # cleaned: the definition without the quoted examples
    hypernyms: tuple[str, ...]  # keys of its class (@) and instance (@i) hypernyms, file order

    @property
    def key(self) -> str:
        return synset_key(self.pos, self.offset)


MIN_GLOSS_WORDS = 4  # shorter glosses ("a person") name no meaning an answer could match
HYPERNYM_POINTERS = ("@", "@i")


def synset_key(pos: str, offset: str) -> str:
    """Offsets are per part-of-speech file, so a synset is named by both."""
    return f"{pos}:{offset}"


def _clean_gloss(raw: str) -> str:
    definition = raw.split('; "')[0].split(' "')[0]
    return " ".join(definition.strip().rstrip(";").split())


def _database_lines(path: Path) -> Iterator[str]:
    """The lines of a WordNet database file, without its indented licence header."""
    if not path.is_file():
        raise SourceMissingError(f"{path} not found: apt-get install wordnet-base")
    with open(path, encoding="utf-8", errors="replace") as handle:
        yield from (line for line in handle if not line.startswith(" "))


def sense_counts(root: Path = WORDNET_DIR) -> dict[str, int]:
    """Number of synsets of each lemma across all parts of speech."""
    counts: dict[str, int] = {}
    for pos in POS_FILES:
        for line in _database_lines(root / f"index.{pos}"):
            fields = line.split()
            counts[fields[0]] = counts.get(fields[0], 0) + int(fields[2])
    return counts


def read_synsets(pos: str, root: Path = WORDNET_DIR) -> Iterator[Synset]:
    """The synsets of ``data.{pos}`` in file order (wndb(5WN): offset, lexicographer file
    number, type, hex word count, words with lex ids, decimal pointer count, pointers of
    4 fields, [verb frames,] ``|`` gloss)."""
    for line in _database_lines(root / f"data.{pos}"):
        head, _, raw_gloss = line.partition(" | ")
        fields = head.split()
        n_words = int(fields[3], 16)
        after_words = 4 + 2 * n_words
        n_pointers = int(fields[after_words])
        pointers = fields[after_words + 1 : after_words + 1 + 4 * n_pointers]
        hypernyms = tuple(
            synset_key(pos, pointers[i + 1])
            for i in range(0, len(pointers), 4)
            if pointers[i] in HYPERNYM_POINTERS
        )
        yield Synset(
            pos=pos,
            offset=fields[0],
            lexname=LEXNAMES[int(fields[1])],
            lemmas=tuple(fields[4:after_words:2]),
            gloss=_clean_gloss(raw_gloss),
            hypernyms=hypernyms,
        )


def read_wordnet_senses(root: Path = WORDNET_DIR) -> dict[str, list[Sense]]:
    """Per lexicographer file, the synsets that have a monosemous, plain-letter lemma.

    A monosemous word makes "what does X mean?" have exactly one true answer, and it keeps
    prompts disjoint across domains (the word cannot also live in another lexicographer file).
    """
    counts = sense_counts(root)
    by_lexname: dict[str, list[Sense]] = {}
    seen_glosses: set[str] = set()
    for pos in ("noun", "verb"):
        for synset in read_synsets(pos, root):
            gloss = synset.gloss
            if len(words(gloss)) < MIN_GLOSS_WORDS or gloss in seen_glosses:
                continue
            for lemma in synset.lemmas:
                plain = lemma.replace("_", "").replace("-", "")
                if counts.get(lemma.lower()) == 1 and plain.isalpha() and plain.islower():
                    seen_glosses.add(gloss)
                    by_lexname.setdefault(synset.lexname, []).append(
                        Sense(lemma.replace("_", " "), gloss, synset.lexname, synset.offset)
                    )
                    break
    return by_lexname


@dataclass(frozen=True)
class WordNetGraph:
    """Noun and verb synsets by key, and the inverse of their hypernym pointers."""

    synsets: dict[str, Synset]
    hyponyms: dict[str, tuple[str, ...]]  # hypernym key -> keys of its hyponyms, sorted

    def siblings(self, key: str) -> list[Synset]:
        """Co-hyponyms: the other hyponyms of the synset's first hypernym, in key order."""
        parents = self.synsets[key].hypernyms
        if not parents:
            return []
        return [self.synsets[k] for k in self.hyponyms.get(parents[0], ()) if k != key]


def read_wordnet_graph(root: Path = WORDNET_DIR) -> WordNetGraph:
    synsets = {s.key: s for pos in ("noun", "verb") for s in read_synsets(pos, root)}
    below: dict[str, set[str]] = {}
    for synset in synsets.values():
        for parent in synset.hypernyms:
            below.setdefault(parent, set()).add(synset.key)
    return WordNetGraph(synsets, {k: tuple(sorted(v)) for k, v in below.items()})
