"""`stream-rl eval`: sampling k candidates per question and voting over their
final answers (majority, quality-head ranks, DeepConf confidence)."""
