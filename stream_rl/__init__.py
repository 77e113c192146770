"""stream_rl: asynchronous partial-rollout streaming RL for LLMs.

`from stream_rl import RolloutSource`: a job's rollouts for a learner of
your own (docs/own-learner.md). Imported on first use: the command line and
the generators do not pay for torch's import through it.
"""

__version__ = "0.1.0"
__all__ = ["RolloutBatch", "RolloutSource", "SourceError"]


def __getattr__(name: str):
    if name in __all__:
        from stream_rl.learner import source

        return getattr(source, name)
    raise AttributeError(f"module 'stream_rl' has no attribute {name!r}")
