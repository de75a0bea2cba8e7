"""docs/security.md names the test that proves each defence: every one must exist, so the table
cannot rot. A reference is `file::name`: a pytest test (`def name(`) in tests/, or a Rust test
(`fn name(` under `#[test]` or in a `proptest!` block) in core/tests/ or core/src/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
REFERENCE = re.compile(r"`([\w./-]+\.(?:py|rs))::(\w+)`")
THREATS = ["token theft", "ip spoofing", "algorithm and key confusion", "signature malleability",
           "path and header equivalence", "identity provider outage", "identity provider compromise",
           "certificate forgery", "log leakage", "resource exhaustion", "misconfiguration",
           "supply chain"]


def references(text):
    return REFERENCE.findall(text)


def missing(path, name):
    """Why `path`::`name` is not a test of this repository, or None when it is."""
    if not (path.startswith("tests/") and path.endswith(".py")) and \
            not (path.startswith(("core/tests/", "core/src/")) and path.endswith(".rs")):
        return f"{path}: tests live in tests/*.py, core/tests/ or core/src/"
    file = ROOT / path
    if not file.is_file():
        return f"{path}: no such file"
    lines = file.read_text().splitlines()
    if path.endswith(".py"):
        if not name.startswith("test_"):
            return f"{path}::{name}: pytest runs only test_* functions"
        return None if any(re.match(rf"\s*(async\s+)?def {name}\(", l) for l in lines) \
            else f"{path}: no `def {name}(`"
    for i, line in enumerate(lines):
        if re.match(rf"\s*(pub\s+)?fn {name}\s*\(", line):
            before = "\n".join(lines[max(0, i - 8):i])
            text = "\n".join(lines[:i])
            if "#[test]" in before or text.rfind("proptest!") > text.rfind("\n}"):
                return None
            return f"{path}: `fn {name}` is not marked #[test] nor inside proptest!"
    return f"{path}: no `fn {name}(`"


def table_rows(text):
    return [l for l in text.splitlines() if l.startswith("| **")]


def test_every_test_the_threat_model_names_exists():
    refs = references(DOC.read_text())
    assert len(refs) >= 30, f"only {len(refs)} test references in {DOC}"
    problems = [p for p in (missing(path, name) for path, name in refs) if p]
    assert not problems, "docs/security.md names tests that do not exist:\n" + "\n".join(problems)


def test_every_threat_has_a_row_and_each_row_a_test():
    rows = table_rows(DOC.read_text())
    for threat in THREATS:
        assert any(threat in r.lower() for r in rows), f"no row for {threat!r} in {DOC}"
    for row in rows:
        assert references(row.split("|")[-2]), f"a row names no test in its last column: {row[:80]}"


def test_the_check_catches_a_renamed_or_unmarked_test():
    assert missing("tests/test_replay.py", "test_without_ip_each_token_once") is None
    assert missing("core/tests/props_parsers.rs", "forwarded_for_never_yields_an_address_left_of_the_trusted_hops") is None
    assert "no `def" in missing("tests/test_replay.py", "test_without_ip_each_token_twice")
    assert "no such file" in missing("tests/test_nothing.py", "test_x")
    assert "not marked" in missing("core/src/path.rs", next(
        m.group(1) for m in re.finditer(r"^\s*(?:pub\s+)?fn (\w+)\s*\(", (ROOT / "core/src/path.rs").read_text(), re.M)
        if missing("core/src/path.rs", m.group(1)) is not None))
    assert "test_" in missing("tests/conftest.py", "start_envoy")
