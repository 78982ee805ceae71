"""docs/RELIABILITY.md names, for every fault, the test that proves what it gets: each named test must exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def named_tests():
    """(file, test) for every `file.py::test_name` in the table, the file relative to tests/ (`ops/test_mezo.py`);
    `::test_name` alone refers to the last file."""
    found, last = [], None
    for cell in re.findall(r"`((?:\w+/)*test_\w+\.py)?(::\w+)?`", (ROOT / "docs" / "RELIABILITY.md").read_text()):
        file, name = cell
        last = file or last
        if file or name:
            found.append((last, name[2:] if name else None))
    return found


def test_every_named_test_exists():
    names = named_tests()
    assert len(names) > 40
    for file, name in names:
        source = (ROOT / "tests" / file).read_text()
        if name is not None:
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{file}::{name} is named in RELIABILITY.md"
