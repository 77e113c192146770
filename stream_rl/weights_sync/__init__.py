from stream_rl.weights_sync.base import WeightSender


def make_weight_sender(cfg, run_dir) -> WeightSender:
    from stream_rl.weights_sync.file import FileWeightSender

    assert cfg.weights_sync.backend == "file"  # the only backend the config admits today
    return FileWeightSender(f"{run_dir}/weights")
