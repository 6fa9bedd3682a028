"""The prefill worker: ``kvrelay.v1.Prefill``, called by decode workers with a deadline.

It receives token ids, the salt and decode's block hashes (never K/V bytes), checks that
both workers run the same model (fingerprint) and that the hashes match, loads the cached
prefix from the store as context, computes K/V of the remaining full blocks on its compute
thread, publishes them, and answers with how many leading prompt tokens the store holds.
``server`` wires the process, ``servicer`` translates, ``worker`` does the work.
"""
