"""What a settings change does to the running agent, said honestly.

The apps apply a change (apply_settings); this module only says what became
of it, from the old and new sections and each key's `applies` flag
(tcprc.keys): the detail line `config set` answers with, and the two lines
SIGHUP logs (what was applied, and a WARNING naming what waits for a
restart). A key that needs a restart is compared with the value the agent
started with (Config.started), so it is reported until the restart.
"""

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from ..keys import LIVE, NEW, RESTART, SESSION
from . import tomlwrite
from .config import (DEVICE_TABLE_KEYS, SCHEMA, SECRET_KEYS, device_table, one_line,
                     server_value)

HIDDEN = "<hidden>"

# How each flag reads in the samples' comments (a test checks them) and in answers.
_SESSION_NOTE = {"device": "restarts the tunnel", "server": "restarts the sessions it affects"}
_NOTES = {LIVE: "applies at once", NEW: "applies to new uplinks", RESTART: "needs a restart"}


def note(role: str, applies: str) -> str:
    """"applies at once", "restarts the tunnel", ...: when a change of a key applies."""
    return _SESSION_NOTE[role] if applies == SESSION else _NOTES[applies]


# `config set` KEY = VALUE: ...
_APPLIED = {
    LIVE: "applied at once",
    NEW: "applied to new uplinks; live sessions keep the old value until they redial",
}
_APPLIED_SESSION = {"device": "applied: a running tunnel redials with it",
                    "server": "applied: the sessions it affects restart (their devices redial)"}

# SIGHUP: "reloaded FILE: applied at once: ...; applied by restarting the tunnel: ..."
_GROUPS = {LIVE: "applied at once", NEW: "applied to new uplinks"}
_GROUP_SESSION = {"device": "applied by restarting the tunnel",
                  "server": "applied by restarting the sessions they affect"}

_WEIGHT = {LIVE: 0, NEW: 1, SESSION: 2, RESTART: 3}


class Change(NamedTuple):
    name: str        # "server.listen"; "server.devices.gw1 (added)" for a device table
    applies: str     # keys.APPLIES
    value: str       # the new value as `config get` shows it ("" for a table)
    running: str     # the value the agent had (RESTART: started with), shown likewise


def shown(key: str, value: Any) -> str:
    """A value as a message may show it: a secret hidden, a table by its names."""
    if key in SECRET_KEYS:
        return HIDDEN if value is not None else '""'
    if isinstance(value, Mapping):
        return "(%s)" % (", ".join(sorted(value)) or "none")
    if isinstance(value, tuple):   # [device] server: as the file writes it
        value = server_value(value)
    try:
        return one_line(tomlwrite.format_value(value))
    except TypeError:
        return one_line(value)


def _value(section: Any, key: str) -> Any:
    return None if section is None else getattr(section, key)


def changes(role: str, old: Dict[str, Any], new: Dict[str, Any],
            started: Dict[str, Any]) -> List[Change]:
    """What differs from `old` (the sections the agent has) to `new` (those it gets), in
    schema order; a key that needs a restart is compared with `started` instead."""
    found = []
    for section, keys in SCHEMA[role].items():
        before, after, first = old.get(section), new.get(section), started.get(section)
        if (first is None) != (after is None):   # an optional table ([cluster]) added or removed
            found.append(Change("[%s] (%s)" % (section, "added" if first is None else "removed"),
                                RESTART, "", ""))
            continue
        for key, spec in keys.items():
            name = "%s.%s" % (section, key)
            baseline = first if spec.applies == RESTART else before
            then, now = _value(baseline, key), _value(after, key)
            if then == now:
                continue
            if key == "devices":
                found += _device_changes(then or {}, now or {})
            else:
                found.append(Change(name, spec.applies, shown(key, now), shown(key, then)))
    return found


def _device_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[Change]:
    """[server.devices.ID] tables added, removed or changed: one Change each, as strong
    as its strongest changed key (DEVICE_TABLE_KEYS)."""
    found = []
    for ident in sorted(set(old) | set(new)):
        before, after = old.get(ident), new.get(ident)
        if before == after:
            continue
        table = device_table(ident)
        if before is None:   # a new device may dial in: nothing restarts
            found.append(Change(table + " (added)", LIVE, "", ""))
        elif after is None:   # its session ends
            found.append(Change(table + " (removed)", SESSION, "", ""))
        else:
            keys = [key for key, field in (("host", "host"), ("secret", "secret"),
                                           ("previous_secret", "previous"),
                                           ("services", "services"))
                    if getattr(before, field) != getattr(after, field)]
            applies = max((DEVICE_TABLE_KEYS[key] for key in keys), key=_WEIGHT.__getitem__,
                          default=SESSION)
            found.append(Change("%s (%s)" % (table, ", ".join(keys)), applies, "", ""))
    return found


def set_answer(role: str, section: str, key: str, before: Any, after: Any, started: Any,
               applied: bool) -> str:
    """The detail line of `config set section.key`: the value, and what became of it.
    `applied`: whether anything was handed the new settings (the app, the logging)."""
    spec = SCHEMA[role][section][key]
    now = _value(after, key)
    head = "%s.%s = %s: " % (section, key, shown(key, now))
    if spec.applies == RESTART:
        then = _value(started, key)
        if now == then:
            return head + "as the running %s has it; nothing waits for a restart" % role
        return head + "needs a restart; the running %s keeps %s" % (role, shown(key, then))
    if now == _value(before, key):
        return head + "unchanged"
    if not applied:
        return head + "kept; nothing running here applies it, it takes effect at the next start"
    if spec.applies == SESSION:
        return head + _APPLIED_SESSION[role]
    return head + _APPLIED[spec.applies]


def reload_lines(role: str, source: str, found: List[Change]) -> Tuple[str, Optional[str]]:
    """SIGHUP's two lines: what was applied (always), what waits for a restart (or None)."""
    groups = []
    for applies in (LIVE, SESSION, NEW):
        names = [change.name for change in found if change.applies == applies]
        if names:
            title = _GROUP_SESSION[role] if applies == SESSION else _GROUPS[applies]
            groups.append("%s: %s" % (title, ", ".join(names)))
    applied = "reloaded %s: %s" % (source, "; ".join(groups) if groups else "no change to apply")
    waiting = ["%s = %s (running %s)" % (change.name, change.value, change.running)
               if change.value else change.name
               for change in found if change.applies == RESTART]
    if not waiting:
        return applied, None
    return applied, one_line("reload: needs a restart to apply: " + ", ".join(waiting))
