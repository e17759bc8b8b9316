"""Text quality rules: each drop has a reason; good captions survive, cleaned."""

import pytest

from pipelines.filter import FilterSettings, judge

SETTINGS = FilterSettings()
BOILER = frozenset(SETTINGS.boilerplate)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("dog", "too_short"),
    ("a" * 1001, "too_long"),
    ("IMG_1234.jpg", "file_name"),
    ("DSC01234", "file_name"),
    ("image001.png", "file_name"),
    ("holiday-photo.JPEG", "file_name"),
    ("3f2a9c0d1e4b5a6c7d8e", "file_name"),
    ("a8Fk29dLq0ZmX71pQr4s-Tz", "file_name"),
    ("https://example.com/a.jpg", "url"),
    ("www.example.org", "url"),
    ("example.com", "url"),
    ("Thumbnail", "boilerplate"),
    ("[ Click here ]", "boilerplate"),
    ("spacer", "boilerplate"),
    ("a\x07bell ringing", "control_chars"),
    ("broken \ufffd text here", "mojibake"),
])
def test_each_rule_drops_with_its_reason(text, reason):
    assert judge(text, SETTINGS, BOILER)[0] == reason


@pytest.mark.parametrize("text", [
    "A red fox jumping over a fence", "Photo of the Eiffel Tower at night", "Logo of the BBC",
    "2008 Olympic Games opening ceremony", "Café in Paris", "Ein roter Fuchs im Schnee",
])
def test_good_captions_survive(text):
    assert judge(text, SETTINGS, BOILER) == (None, text)


def test_mojibake_is_repaired_and_whitespace_collapsed():
    assert judge("CafÃ©   in\n Paris", SETTINGS, BOILER) == (None, "Café in Paris")


def test_thresholds_come_from_the_recipe():
    strict = SETTINGS.model_copy(update={"min_words": 3, "min_chars": 1})
    assert judge("two words", strict, BOILER)[0] == "too_few_words"
    assert judge("three small words", strict, BOILER)[0] is None


def test_language_filter_is_offline_and_optional():
    english = SETTINGS.model_copy(update={"languages": ["en"], "min_language_confidence": 0.9})
    assert judge("Ein roter Fuchs springt über den hohen Zaun im Garten", english, BOILER)[0] == "language:de"
    assert judge("A red fox jumps over the high fence in the garden", english, BOILER)[0] is None
