"""stream_rl: asynchronous partial-rollout streaming RL for LLMs."""

__version__ = "0.1.0"
