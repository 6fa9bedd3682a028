"""kvrelay's prefix cache store: block hashing, the block codec, Redis block stores.

See ``docs/architecture.md`` for the public surface and ``../shared/DESIGN.md`` for the
block format's invariants.
"""
