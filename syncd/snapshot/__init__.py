"""Run directories that hold snapshots (JSON or YAML files rewritten in place), not event logs.

``mapping`` reads a mapping file, ``translate`` (pure) turns the difference between the
last applied snapshot and the current one into v1 events, ``derived`` keeps those events
in a record of syncd's own that the engine syncs like any other.
"""
