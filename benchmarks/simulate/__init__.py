"""`stream-rl simulate`: the project's own schedulers (`controller/schedules.py`,
`RolloutController`, `Job`, the pruner and the recycling buffer) run on a
virtual clock against cost models of the engines and the learner
(docs/simulator.md)."""
