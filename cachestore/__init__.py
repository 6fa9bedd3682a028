"""kvrelay's prefix cache store: block hashing, the block codec, Redis block stores.

``hashing``      chained SHA-256 block hashes and store keys (one module, every process)
``fingerprint``  the model fingerprint that separates incompatible blocks
``codec``        the block value: a 96-byte header (defined once) and the raw K/V payload
``store``        the ``BlockStore`` protocol; in-memory and null stores
``redis_store``  ``RedisBlockStore``: standalone, cluster, TLS, ACL users
``resp``, ``pipeline``, ``routing``, ``arena``  the zero-copy wire path under it
``kvstore``      ``PrefixCache``: what the services call
``stats``        counters and rate-limited logging

See ``docs/architecture.md`` for the public surface and ``../shared/DESIGN.md`` for the
block format's invariants.
"""
