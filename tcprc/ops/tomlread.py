"""The TOML reader: tomllib, or tomli before Python 3.11; ops.config,
ops.tomlwrite and ops.devadd take it from here.
"""

import sys


# The one place that picks the TOML reader.
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on old interpreters only
    import tomli as tomllib
