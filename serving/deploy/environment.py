"""Check a spec's container environment the way the server will read it at start-up.

A bad ``OPTION_*`` value found here costs a second; found by SageMaker it costs an endpoint creation
that fails after the instance was provisioned and the weights downloaded. Values are parsed by the
server's own option table (serving/options.py), so the check cannot drift from the server.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping


def check_environment(env: Mapping[str, str], field: str, problems: list[str], warnings: list[str]) -> None:
    """Append one problem per declared key with a bad value, one warning per key the server ignores."""
    from serving.errors import ConfigError
    from serving.options import KNOWN_KEYS, OPTIONS, parse_value
    from serving.properties import load_properties

    props = load_properties(None, env)
    for spec in OPTIONS.values():
        for key in spec.keys:
            raw = props.values.get(key, "")
            if not raw.strip():
                continue
            try:
                parse_value(spec, key, raw, props.source(key))
            except ConfigError as exc:
                problems.append(f"{field}: {exc.message}")
    for key in props.values:
        if key in KNOWN_KEYS or key.startswith("batch_"):
            continue
        close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        warnings.append(f"{field}: {props.source(key)} sets {key!r}, which the server does not read{hint}")
