"""Faults, load generators and invariants (the drills of a later issue build on these)."""
