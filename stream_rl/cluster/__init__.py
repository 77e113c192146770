"""Launchers that place the roles on a cluster the user already runs
(`launch: ray`; SLURM's template is examples/slurm/). The roles and the
job are the same as by hand: a launcher only starts them and tells each
where the others are (docs/cluster.md)."""
