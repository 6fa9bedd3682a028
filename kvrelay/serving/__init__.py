"""gRPC plumbing shared by the prefill and decode workers: settings from flags and
``KVRELAY_*`` variables, the error interceptor, health and draining, server options,
structured logs. No model and no store code lives here.
"""
