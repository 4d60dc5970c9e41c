"""BENCHMARKS.md sections: each benchmark replaces only its own block."""

from __future__ import annotations

from edgetune.bench.markdown import write_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path):
    path = tmp_path / "B.md"
    write_section(path, "memory", "old memory table")
    write_section(path, "zo", "zo table")
    write_section(path, "memory", "new memory table")
    text = path.read_text()
    assert "new memory table" in text and "old memory table" not in text
    assert text.count("<!-- bench:memory -->") == 1
    assert text.index("new memory table") < text.index("zo table")
