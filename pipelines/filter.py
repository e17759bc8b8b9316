"""Filter: text quality rules over the candidates. A side table, row-aligned with each candidates
partition: `filtered/part-<key>.parquet` (uid, ok, reason, text). Every dropped row stays, with its
reason; `text` is the cleaned text (mojibake repaired, whitespace collapsed) that matching uses."""

from __future__ import annotations

import re
import string
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc
from wit_builder.runner import Manifest, Stage, Task, partition_entry
from wit_builder.shuffle import read_slice
from wit_builder.workspace import Run, read_table, write_parquet

VERSION = 1
FILTERED_SCHEMA = pa.schema([("uid", pa.string()), ("ok", pa.bool_()), ("reason", pa.string()),
                             ("text", pa.string())])

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


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def judge(text: str, s: dict, boilerplate: frozenset) -> tuple[str | None, str]:
    """(reason or None, cleaned text) for one caption under the filter settings `s`."""
    if s["fix_text"] and not text.isascii():
        import ftfy

        text = ftfy.fix_text(text)
    text = " ".join(text.split())
    if not text:
        return "empty", text
    if "\ufffd" in text:
        return "mojibake", text
    if _CONTROL.search(text):
        return "control_chars", text
    if len(text) < s["min_chars"]:
        return "too_short", text
    if len(text) > s["max_chars"]:
        return "too_long", text
    if len(text.split()) < s["min_words"]:
        return "too_few_words", text
    if _URL.match(text):
        return "url", text
    if _FILE_NAME.search(text):
        return "file_name", text
    if text.lower().strip(_EDGE_PUNCT) in boilerplate:
        return "boilerplate", text
    if s["languages"]:
        lang, confidence = _language_identifier().classify(text)
        if lang not in s["languages"] and confidence >= s["min_language_confidence"]:
            return f"language:{lang}", text
    return None, text


def filter_part(candidates: str, duplicates: list[str], part: int, settings: dict, output: str) -> dict:
    table = read_table(candidates, columns=["uid", "text"])
    dup_reason = {}
    for path in duplicates:
        dups = read_slice(path, part, ["row", "reason"]).to_pydict()
        dup_reason.update(zip(dups["row"], dups["reason"]))
    boilerplate = frozenset(b.lower().strip(_EDGE_PUNCT) for b in settings["boilerplate"])
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


class FilterStage(Stage):
    name = "filter"
    upstream = "candidates"

    def plan(self, run: Run):
        up = self.upstream_manifest(run)
        settings = run.recipe.filter.model_dump(mode="json")
        out = run.stage_dir("filtered")
        tasks = []
        for index, part in enumerate(up.partitions):
            output = str(out / f"part-{part['key']}.parquet")
            tasks.append(Task(
                stage=self.name, key=part["key"], func=filter_part,
                kwargs={"candidates": part["files"]["candidates"], "duplicates": up.outputs["duplicates"],
                        "part": index, "settings": settings, "output": output},
                outputs=[output], marker=str(run.marker_path(self.name, part["key"])),
                inputs={"version": VERSION, "upstream": part["fingerprint"], "duplicates": up.fingerprint,
                        "settings": settings},
                weight=part["info"].get("candidates", 1) or 1))
        yield tasks
        return Manifest(self.name, [partition_entry(t, {**p["files"], "filtered": t.outputs[0]})
                                    for t, p in zip(tasks, up.partitions)])
