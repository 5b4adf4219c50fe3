"""Side-by-side performance measurements of the exporter (GitHub issue 7).

`python -m benchmarks` (or `make bench`) runs five cases and prints one table, each figure
beside the parse limit (msgspec decoding the same bytes) and a naive peer (`json.loads` plus
prometheus-client metrics): ingest, history scaling, scrape latency, memory, exposition.
`run.py` orchestrates; one module per case; `naive_peer.py` is the peer, `servers.py` the fake
API processes, `procs.py` the subprocess plumbing. See BENCHMARKS.md for a full run.
"""
