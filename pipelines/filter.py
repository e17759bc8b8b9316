"""Filter: text quality rules over the candidates. A side table, row-aligned with each candidates
partition: `filtered/part-<key>.parquet` (uid, ok, reason, text). Every dropped row stays, with its
reason; `text` is the cleaned text (mojibake repaired, whitespace collapsed) that matching uses."""

from __future__ import annotations

import re
import string

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipelines.candidates.duplicates import duplicates_of
from wit_builder.language import identify
from wit_builder.recipe import Section
from wit_builder.runner import Manifest
from wit_builder.stage import Stage, View
from wit_builder.workspace import Run, read_table, write_parquet

VERSION = 1
FILTERED_SCHEMA = pa.schema([("uid", pa.string()), ("ok", pa.bool_()), ("reason", pa.string()),
                             ("text", pa.string())])

BOILERPLATE = [
    "image", "images", "img", "photo", "photos", "picture", "pic", "logo", "icon", "spacer",
    "thumbnail", "thumb", "click here", "click to enlarge", "banner", "button", "avatar",
    "placeholder", "untitled", "null", "none", "undefined", "blank", "pixel", "spacer gif",
    "image not found", "no image", "loading", "arrow", "bullet", "divider", "advertisement", "ad",
    "more", "read more", "default", "alt", "alt text", "photo credit", "featured image",
]


class FilterSettings(Section):
    """Text rules: every dropped caption keeps its reason."""

    min_chars: int = Field(default=5, ge=0)
    """Shorter texts (after whitespace is collapsed) are dropped as `too_short`."""
    min_words: int = Field(default=1, ge=0)
    """Texts of fewer words are dropped as `too_few_words`."""
    max_chars: int = Field(default=1000, ge=1)
    """Longer texts are dropped as `too_long`."""
    boilerplate: list[str] = BOILERPLATE
    """Whole-text matches (case-insensitive, surrounding punctuation ignored) that are dropped."""
    fix_text: bool = True
    """Repair mojibake with ftfy before every other rule."""
    languages: list[str] = []
    """ISO 639-1 codes to keep, judged offline by py3langid; empty keeps every language."""
    min_language_confidence: float = Field(default=0.8, ge=0, le=1)
    """A text is dropped for language only when the detector is at least this sure."""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_URL = re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$|^[\w.-]+\.(?:com|org|net|edu|gov|io|co|de|uk|jp|"
                  r"fr|ru|cn|info|biz)(?:/\S*)?$", re.I)
_FILE_NAME = re.compile(
    r"^(?:img|dsc|dscn|dscf|dcim|pic|pict|p|mvimg|pxl|screenshot|image|photo|scan|gopr|sam|wp|"
    r"whatsapp image)[\s_-]*\d[\d\s_.:-]*(?:\.\w{2,4})?$"
    r"|\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|heic|avif)$"
    r"|^[0-9a-f]{12,}$"
    r"|^(?=\S*\d)(?=\S*[a-z])[\w-]{20,}$",
    re.I,
)
_EDGE_PUNCT = string.punctuation + string.whitespace


def judge(text: str, s: FilterSettings, boilerplate: frozenset) -> tuple[str | None, str]:
    """(reason or None, cleaned text) for one caption under the filter settings `s`."""
    if s.fix_text and not text.isascii():
        import ftfy

        text = ftfy.fix_text(text)
    text = " ".join(text.split())
    if not text:
        return "empty", text
    if "\ufffd" in text:
        return "mojibake", text
    if _CONTROL.search(text):
        return "control_chars", text
    if len(text) < s.min_chars:
        return "too_short", text
    if len(text) > s.max_chars:
        return "too_long", text
    if len(text.split()) < s.min_words:
        return "too_few_words", text
    if _URL.match(text):
        return "url", text
    if _FILE_NAME.search(text):
        return "file_name", text
    if text.lower().strip(_EDGE_PUNCT) in boilerplate:
        return "boilerplate", text
    if s.languages:
        lang, confidence = identify(text)
        if lang not in s.languages and confidence >= s.min_language_confidence:
            return f"language:{lang}", text
    return None, text


def filter_part(candidates: str, duplicates: str, part: int, settings: FilterSettings, output: str) -> dict:
    table = read_table(candidates, columns=["uid", "text"])
    dups = duplicates_of(duplicates, part).to_pydict()
    dup_reason = dict(zip(dups["row"], dups["reason"]))
    boilerplate = frozenset(b.lower().strip(_EDGE_PUNCT) for b in settings.boilerplate)
    reasons, texts = [], []
    for row, text in enumerate(table.column("text").to_pylist()):
        reason, cleaned = judge(text or "", settings, boilerplate)
        reasons.append(dup_reason.get(row, reason))
        texts.append(cleaned)
    reason_arr = pa.array(reasons, pa.string())
    write_parquet(pa.table({"uid": table.column("uid"), "ok": pc.is_null(reason_arr),
                            "reason": reason_arr, "text": pa.array(texts, pa.string())},
                           schema=FILTERED_SCHEMA), output)
    kept = sum(r is None for r in reasons)
    return {"rows": len(reasons), "kept": kept, "dropped": len(reasons) - kept}


FUNNEL = """
SELECT 'filter dropped' AS step, reason, count(*) AS rows FROM filtered WHERE NOT ok GROUP BY reason
UNION ALL SELECT 'filter kept', NULL, count(*) FROM filtered WHERE ok
"""


class FilterStage(Stage):
    name = "filter"
    needs = ("candidates",)
    settings = FilterSettings
    provides = {"filtered": FILTERED_SCHEMA}
    views = (View("filtered", "filtered/part-*.parquet"),)
    main_view = "filtered"
    funnel = FUNNEL
    kept = ("filter kept", "SELECT count(*) FROM filtered WHERE ok")

    def empty_hint(self, probe) -> str | None:
        if probe.count("filtered", "ok"):
            return None
        return (f"all {probe.count('filtered')} candidates dropped by the filter: {probe.top('filtered', 'NOT ok')}; "
                "see [filter]")

    def plan(self, run: Run):
        up = self.needed(run, "candidates")
        settings = run.recipe.filter
        out = run.stage_dir("filtered")
        tasks = []
        for index, part in enumerate(up.parts()):
            output = str(out / f"part-{part.key}.parquet")
            tasks.append(self.task(
                run, part.key, filter_part,
                kwargs={"candidates": part.file("candidates"), "duplicates": up.output("duplicates"),
                        "part": index, "settings": settings, "output": output},
                outputs=[output],
                inputs={"version": VERSION, "upstream": part.fingerprint, "duplicates": up.fingerprint,
                        "settings": settings.model_dump(mode="json")},
                weight=part.info.get("candidates", 1) or 1))
        yield tasks
        return Manifest(self.name, [p.entry(t, {"filtered": t.outputs[0]}) for t, p in zip(tasks, up.parts())])
