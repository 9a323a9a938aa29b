"""docs/BAD_INPUTS.md names, for each case, the test that reproduces it: every name it gives must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bad_inputs_table_names_tests_that_exist():
    defined = {f.name: set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
               for f in (ROOT / "tests").glob("test_*.py")}
    missing, current = [], None
    for line in (ROOT / "docs" / "BAD_INPUTS.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        cell = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
        # "file.py::name" sets the file; a bare "::name" is in the file named last; "name_*" is a prefix
        for file, name in re.findall(r"(test_\w+\.py)?::(test_\w+\*?)", cell):
            current = file or current
            names = defined.get(current, set()) if current else set()
            ok = any(n.startswith(name[:-1]) for n in names) if name.endswith("*") else name in names
            if not ok:
                missing.append(f"{current}::{name}")
    assert not missing, missing
