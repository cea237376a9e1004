"""Edge processing, per source: rename, scale, drop/keep, deadband, aggregate.

A source may list processors (`[[sources.processors]]`); they run in order on the readings of
each put, before the buffer accepts them (`chain.ProcessingIntake`). One module per type, each
with its frozen config class and its processor; `registry` finds them by `type`. What a
processor needs committed with the readings (deadband state, aggregate windows) travels with
the put and is committed in the same transaction (`durable`), so processing never weakens
what the buffer guarantees.
"""
