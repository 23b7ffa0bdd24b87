"""A prompt and output filter: an operator-owned blocklist of words and regular expressions.

The blocklist is a plain UTF-8 text file, one rule per line::

    # lines starting with # and blank lines are ignored
    # a word or phrase, matched as whole words:
    weapons: nerve agent
    # re: then a Python regular expression (re module syntax):
    weapons: re:sarin|tabun
    private-data: re:\\b\\d{3}-\\d{2}-\\d{4}\\b

``name`` (letters, digits, ``_ . -``) is what a refusal reports; several lines may share a name.
Everything after the first ``:`` (stripped) is the rule. A trailing ``  # comment`` after a word
rule is removed; a regex line keeps every character, comments included (put them on their own line).

Matching happens on *normalised* text, and word rules are normalised the same way:

1. Unicode NFKC (fullwidth ``ｂａｄ`` -> ``bad``, ligatures, compatibility forms), then casefold
   (``BAD``, ``Straße`` -> ``strasse``);
2. combining marks removed (``b\u0301ad`` and ``bád`` -> ``bad``);
3. invisible format characters removed (zero-width space / joiners, soft hyphen, word joiner);
4. optional (``confusables=True``): common Cyrillic and Greek look-alike letters mapped to Latin
   (``аррӏе`` in Cyrillic -> ``apple``). Off by default: it can refuse innocent Cyrillic or Greek
   words that happen to spell a Latin rule.

Word rules match whole words (``ass`` does not match ``class``); whitespace inside a phrase matches
any run of whitespace. Regex rules are searched in the normalised text (so write them in lower
case, without accents); they are also compiled with ``re.IGNORECASE``. A regex that matches the
empty string is refused (it would block everything).

Limits: a blocklist catches spellings, not meaning; spaced-out or punctuated spellings
(``b.a.d``) and other languages need their own rules. Refusals name the rule, never the
matched text (so a server never echoes one user's blocked text into logs or another answer).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ditkit.errors import ConfigError

__all__ = ["Blocklist", "Refused", "Rule", "normalise", "EXAMPLE_BLOCKLIST"]

# An example file for operators (serve documents it; it blocks nothing real).
EXAMPLE_BLOCKLIST = """\
# ditkit safety blocklist: one rule per line, `name: word or phrase` or `name: re:regex`.
# Text is compared after NFKC, casefolding and removal of accents and zero-width characters.
# example-word: forbidden phrase
# example-regex: re:\\bforbidd?en\\b
"""

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# zero width space / non-joiner / joiner, word joiner, soft hyphen, BOM, Mongolian vowel separator
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\u00ad\ufeff\u180e"))
# Cyrillic and Greek letters that look like Latin ones (after casefolding; a short, common subset
# of Unicode's confusables.txt).
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ӏ": "l", "һ": "h",
    "ԛ": "q", "ԝ": "w", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ϲ": "c", "ɡ": "g", "ɑ": "a", "ı": "i",
})


def normalise(text: str, confusables: bool = False) -> str:
    """The text rules are compared with: NFKC, casefold, no combining marks, no invisible format
    characters, and (``confusables``) Cyrillic/Greek look-alikes as Latin. See the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    decomposed = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    if confusables:
        text = text.translate(_CONFUSABLES)
    return text


@dataclass(frozen=True)
class Rule:
    """One blocklist line: its ``name``, where it came from (``source:line``), and the compiled pattern."""

    name: str
    where: str
    pattern: re.Pattern[str]


class Refused(ConfigError):
    """A prompt or generated text matched a blocklist rule; ``rule`` is the rule's name. The
    message names the rule only (servers answer 422 with it)."""

    def __init__(self, rule: str, what: str = "prompt") -> None:
        super().__init__(f"{what} refused by the safety rule {rule!r}")
        self.rule = rule


def _compile(body: str, where: str, confusables: bool) -> re.Pattern[str]:
    if body.startswith("re:"):
        source = body[3:].strip()
        try:
            pattern = re.compile(source, re.IGNORECASE)
        except re.error as err:
            raise ConfigError(f"{where}: bad regular expression {source!r} ({err}); fix or remove the line") from None
        if pattern.search(""):
            raise ConfigError(f"{where}: the regular expression {source!r} matches empty text and would block everything")
        return pattern
    body = re.sub(r"\s+#.*$", "", body).strip()
    words = normalise(body, confusables).split()
    if not words:
        raise ConfigError(f"{where}: empty rule; write `name: word` or `name: re:pattern`")
    phrase = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){phrase}(?!\w)")


class Blocklist:
    """The rules of one blocklist file; ``check(text)`` gives the first matching rule's name.

    An empty list allows everything (the default of ``serve``; the CLI uses no filter unless
    given a file).
    """

    def __init__(self, rules: list[Rule] | tuple[Rule, ...] = (), confusables: bool = False) -> None:
        self.rules = tuple(rules)
        self.confusables = confusables

    @classmethod
    def from_text(cls, text: str, source: str = "<blocklist>", confusables: bool = False) -> "Blocklist":
        """Parse the file format of the module docstring; ``ConfigError`` names ``source:line``."""
        rules = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            name, sep, body = line.partition(":")
            name, body = name.strip(), body.strip()
            if not sep or not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: expected `name: word` or `name: re:pattern` (name of letters, digits, _ . -)")
            rules.append(Rule(name, where, _compile(body, where, confusables)))
        return cls(rules, confusables)

    @classmethod
    def from_file(cls, path: str | Path, confusables: bool = False) -> "Blocklist":
        """Read the operator's blocklist file (UTF-8)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"blocklist file {path} does not exist; create it (see ditkit.safety) or drop the option") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"blocklist file {path} cannot be read as UTF-8 text: {err}") from None
        return cls.from_text(text, str(path), confusables)

    def __len__(self) -> int:
        return len(self.rules)

    def check(self, text: str) -> str | None:
        """The name of the first rule that matches ``text`` after normalisation, or ``None``."""
        if not self.rules:
            return None
        normalised = normalise(text, self.confusables)
        for rule in self.rules:
            if rule.pattern.search(normalised):
                return rule.name
        return None

    def enforce(self, text: str, what: str = "prompt") -> None:
        """Raise ``Refused`` (a ``ConfigError`` naming only the rule) if ``text`` matches a rule;
        ``what`` says what was checked ("prompt", "generated text")."""
        name = self.check(text)
        if name is not None:
            raise Refused(name, what)
