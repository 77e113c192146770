"""Benchmarks that print JSON (`stream-rl bench ...`).

The tools layer, outside the pipeline's import graph: these modules may import
the pipeline (`stream_rl.*`), and nothing in `stream_rl/` imports them (only
`stream_rl/cli.py` dispatches to them, lazily, inside the `bench` command).
Run them as `stream-rl bench <what>` (`generation`, `pruning`, `pruning-bound`,
`learner`, `weight-sync`, `e2e`, `profile`, `correction`).
"""
