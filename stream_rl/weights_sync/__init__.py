from stream_rl.weights_sync.base import WeightSender


def make_weight_sender(cfg, run_dir) -> WeightSender:
    """The configured backend (`weights_sync.backend`)."""
    backend = cfg.weights_sync.backend
    if backend == "torch_dist":
        from stream_rl.weights_sync.torch_dist import TorchDistWeightSender

        # Rank 0: the learner; then every worker of every receiving generator.
        return TorchDistWeightSender(cfg.generator.count, cfg.generator.tensor_parallel_size,
                                     cfg.weights_sync.bucket_mb, cfg.learner.device, cfg.weights_sync.host,
                                     cfg.weights_sync.timeout_s)
    from stream_rl.weights_sync.file import FileWeightSender

    if backend == "shm":
        return FileWeightSender(FileWeightSender.shm_dir(run_dir))
    return FileWeightSender(f"{run_dir}/weights")
