"""The prompt/output blocklist (ditkit.safety): file format, Unicode normalisation, refusals."""

import pytest

from ditkit.errors import ConfigError
from ditkit.safety import EXAMPLE_BLOCKLIST, Blocklist, Refused, normalise

RULES = """\
# operator's list
weapons: nerve agent
weapons: re:sar[i1]n
slur-1: badword   # a trailing comment on a word rule
private-data: re:\\b\\d{3}-\\d{2}-\\d{4}\\b
"""


@pytest.fixture
def blocklist(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text(RULES, encoding="utf-8")
    return Blocklist.from_file(path)


def test_words_phrases_and_regexes_match_by_rule_name(blocklist):
    assert len(blocklist) == 4
    assert blocklist.check("how to make a Nerve   Agent at home") == "weapons"
    assert blocklist.check("SAR1N") == "weapons"
    assert blocklist.check("you badword") == "slur-1"
    assert blocklist.check("my number is 123-45-6789.") == "private-data"
    assert blocklist.check("a cat in a hat") is None


def test_word_rules_match_whole_words_only(blocklist):
    assert blocklist.check("badwords are fine as a different word") is None
    assert blocklist.check("nerve agents") is None  # the phrase, not a prefix of it
    assert blocklist.check("(badword)") == "slur-1"


@pytest.mark.parametrize(
    "trick",
    [
        "ＢＡＤＷＯＲＤ",  # fullwidth letters (NFKC)
        "bádwörd",  # precomposed accents
        "ba\u0301dwo\u0308rd",  # combining accents
        "bad\u200bword",  # zero-width space inside
        "BadWord",  # case
        "nerve\u00a0agent",  # no-break space inside a phrase
    ],
)
def test_unicode_tricks_are_normalised(blocklist, trick):
    assert blocklist.check(trick) is not None


def test_confusables_are_optional(tmp_path):
    cyrillic = "\u0430pple"  # Cyrillic a + "pple"
    plain = Blocklist.from_text("fruit: apple")
    strict = Blocklist.from_text("fruit: apple", confusables=True)
    assert plain.check(cyrillic) is None
    assert strict.check(cyrillic) == "fruit"
    assert normalise("\u0430\u0440\u0440\u04cf\u0435", confusables=True) == "apple"


def test_refusal_names_the_rule_never_the_text(blocklist):
    with pytest.raises(Refused) as e:
        blocklist.enforce("please write about sarin for me", what="prompt")
    assert e.value.rule == "weapons"
    assert "weapons" in str(e.value) and "sarin" not in str(e.value).lower()
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    blocklist.enforce("a harmless prompt")  # no error


def test_generated_text_is_checked_too(blocklist):
    with pytest.raises(Refused, match="generated text refused by the safety rule 'private-data'"):
        blocklist.enforce("...and the code is 987-65-4321", what="generated text")


def test_bad_regex_line_names_the_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("ok: fine\n\n# comment\nbroken: re:(unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"list\.txt:4: bad regular expression") as e:
        Blocklist.from_file(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "line,message",
    [
        ("no colon here", "expected `name: word`"),
        ("bad name!: word", "expected `name: word`"),
        ("empty:", "empty rule"),
        ("everything: re:.*", "matches empty text"),
    ],
)
def test_malformed_lines_are_one_line_errors(line, message):
    with pytest.raises(ConfigError, match=message) as e:
        Blocklist.from_text(f"fine: word\n{line}\n", source="ops.txt")
    assert "ops.txt:2" in str(e.value) and "\n" not in str(e.value)


def test_empty_and_example_lists_allow_everything(tmp_path):
    assert Blocklist().check("anything at all") is None
    example = Blocklist.from_text(EXAMPLE_BLOCKLIST)
    assert len(example) == 0 and example.check("forbidden phrase") is None


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Blocklist.from_file(tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        Blocklist.from_file(bad)
