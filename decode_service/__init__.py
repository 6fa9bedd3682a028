"""The decode worker: the public ``kvrelay.v1.Generation`` front door and the continuous batch.

Modules, outside in: ``server`` (process wiring), ``servicer`` (protobuf <-> domain only),
``convert`` (request checks that need no model; replies), ``prompts`` (token ids and the
checks that need the model), ``worker`` (the request path:
tokenize, check, look up, remote prefill, fetch, admit, stream), ``scheduler`` (the
``LLMEngine`` on its own compute thread), ``prefill_client`` (the internal Prefill call).

Decisions worth knowing:

- ``usage.cached_prompt_tokens`` counts prompt tokens whose blocks were already computed
  when the request arrived (a cache hit): in the store, or held in this worker's KV pool
  by a running request (those are shared, not fetched). Blocks a prefill worker published
  for this very request are fetched like hits but not counted as such.
- A prompt goes to a prefill worker only when at least ``prefill_threshold_tokens`` of it
  are uncached and it has uncached full blocks; otherwise, and whenever the Prefill call
  fails for any reason (counted in ``kvrelay_local_prefill_fallbacks_total{reason}``),
  decode computes the missing full blocks itself, then publishes them.
- Every check that can refuse a request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) runs before
  any store I/O or compute. The engine re-checks on admission.
- Fetched payloads are copied on a store thread from the store client's receive buffer
  straight into KV pool blocks reserved for the request (``kvblocks.BlockLanding``; the
  allocator is thread-safe and no sequence reads those blocks yet); the compute thread
  then adopts them at admission. Only when the pool has no room to spare (or lives on a
  GPU) are they kept as bytes and imported on the compute thread instead.
"""
