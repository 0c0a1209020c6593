"""The run directory's contract, at the bottom of the import graph: what loadgen writes and
analysis reads, defined once (docs/contracts.md). It imports neither of them.

- ``rundir.requests``: a line of ``requests.jsonl`` (``RequestRecord``), built by loadgen, read by analysis.
- ``rundir.errors``: ``ErrorKind``, why a request failed (its ``error_kind``).
- ``rundir.slos``: the SLOs a request is judged against, the one percentile rule, ``meets``.
- ``rundir.jsonl``: the lenient JSON-lines reader (a bad line named ``file:line``, skipped).
- ``rundir.max_context``: a line of ``max_context.jsonl`` (a max-context search's result).
- ``rundir.operators``: a line of ``operators.jsonl`` (a profile pass's kernels), written and read.
"""
