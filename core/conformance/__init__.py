"""The conformance suite every backend must pass, shipped as a pytest plugin.

Run it against any registered backend, ours or a vendor's, without tokenmill's own tests::

    tokenmill conformance --backend NAME

The cases: discovery, device set-up and memory budget, attention numerics against a float64
reference (prefill, decode, mixed batches, lengths crossing block boundaries, GQA, sliding window,
soft-capping), the KV-cache layout and block copies, quantization methods, and tensor parallelism
(the communicator's collectives over 2 ranks, and tiny models sharded over them giving 1 rank's tokens).
"""
