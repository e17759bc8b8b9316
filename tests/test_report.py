"""`wit report`'s gallery: the queries a person wants to browse, not the stop words."""

import io
import json

from PIL import Image

from wit_builder.report import _gallery
from wit_builder.tar import write_shard


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


def test_the_gallery_passes_over_stop_words_of_the_captions_language(tmp_path):
    samples = []
    for i in range(12):
        if i % 2:
            caption, queries = f"a cat on the mat number {i}", ["a", "the", "cat", "mat"]
        else:
            caption, queries = f"der Hund und die Katze im Garten {i}", ["der", "die", "und", "garten"]
        samples.append((f"{i:04d}", jpeg((20 * i, 0, 0)), caption,
                        json.dumps({"queries": queries}).encode()))
    (tmp_path / "shards").mkdir()
    write_shard(str(tmp_path / "shards" / "000000.tar"), samples, "jpg")
    page = _gallery(tmp_path)
    headings = [h.split("</h3>")[0] for h in page.split("<h3>")[1:]]
    assert set(headings) == {"cat", "mat", "garten"}  # "a", "the" (English), "der", "die", "und" (German) left out
