"""Print the oldest versions pyproject.toml allows, one `name==version` per
line: every `>=` floor of the core dependencies and of the `test-core`
extra, so the oldest-dependencies run tests every floor we promise.

llvmlite is not a direct dependency; it is pinned to the release that the
oldest numba was built against (numba's own table of compatible versions).
"""

import re
import sys
import tomllib

# numba X.Y needs llvmlite 0.(Y-17): 0.60 -> 0.43, as numba's install notes list.
LLVMLITE_FOR_NUMBA = {"0.60": "0.43.0", "0.61": "0.44.0", "0.62": "0.45.0"}

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]

pins = {}
for requirement in project["dependencies"] + project["optional-dependencies"]["test-core"]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)\s*", requirement)
    if match is None:
        sys.exit(f"floors.py: no `>=` floor in {requirement!r}: give every dependency one")
    name, _, version = match.groups()
    # a floor written as X.Y means release X.Y.0
    pins[name.lower()] = version if version.count(".") >= 2 else version + ".0"
numba_minor = ".".join(pins["numba"].split(".")[:2])
pins["llvmlite"] = LLVMLITE_FOR_NUMBA[numba_minor]
for name, version in pins.items():
    print(f"{name}=={version}")
