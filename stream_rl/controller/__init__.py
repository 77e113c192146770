"""The controller: the job's own process, between the generators and the
learner. `launch` starts or reaches the roles, `job` holds a run's state
(batches, weight syncs, metrics, checkpoints), `schedules` runs its steps
(sync, april, stream), and `rollouts` turns the generators' streams into
complete groups through the pruner and the recycling buffer."""
