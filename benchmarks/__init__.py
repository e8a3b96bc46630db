"""Benchmarks: scripts that measure hier_lm (and, where installed, the public peers) and write
`benchmarks/results/<name>.{json,md,png}`. They install nothing; `benchmarks/requirements.txt` lists the peers."""
