"""Read the offline text sources: Debian ``fortunes`` categories and WordNet lexicographer files.

Only parsing lives here: which entries are usable, never how they become prompts.
"""

from __future__ import annotations

import re
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


def _clean_gloss(raw: str) -> str:
    definition = raw.split('; "')[0].split(' "')[0]
    return " ".join(definition.strip().rstrip(";").split())


def sense_counts(root: Path = WORDNET_DIR) -> dict[str, int]:
    """Number of synsets of each lemma across all parts of speech."""
    counts: dict[str, int] = {}
    for pos in POS_FILES:
        path = root / f"index.{pos}"
        if not path.is_file():
            raise SourceMissingError(f"{path} not found: apt-get install wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue  # licence header
                fields = line.split()
                counts[fields[0]] = counts.get(fields[0], 0) + int(fields[2])
    return counts


def read_wordnet_senses(root: Path = WORDNET_DIR) -> dict[str, list[Sense]]:
    """Per lexicographer file, the synsets that have a monosemous, plain-letter lemma.

    A monosemous word makes "what does X mean?" have exactly one true answer, and it keeps
    prompts disjoint across domains (the word cannot also live in another lexicographer file).
    """
    counts = sense_counts(root)
    by_lexname: dict[str, list[Sense]] = {}
    seen_glosses: set[str] = set()
    for pos in ("noun", "verb"):
        with open(root / f"data.{pos}", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                head, _, raw_gloss = line.partition(" | ")
                fields = head.split()
                offset, lexnum, n_words = fields[0], int(fields[1]), int(fields[3], 16)
                lemmas = fields[4 : 4 + 2 * n_words : 2]
                gloss = _clean_gloss(raw_gloss)
                if len(words(gloss)) < 4 or gloss in seen_glosses:
                    continue
                for lemma in lemmas:
                    plain = lemma.replace("_", "").replace("-", "")
                    if counts.get(lemma.lower()) == 1 and plain.isalpha() and plain.islower():
                        seen_glosses.add(gloss)
                        by_lexname.setdefault(LEXNAMES[lexnum], []).append(
                            Sense(lemma.replace("_", " "), gloss, LEXNAMES[lexnum], offset)
                        )
                        break
    return by_lexname
