"""Per-step metrics to Weights & Biases (`run.wandb_project`), beside the
JSONL and TensorBoard: one W&B run per job, which a `--resume`d job
continues (its id is kept in OUT/wandb_run_id)."""

from __future__ import annotations

import logging
from pathlib import Path

from stream_rl.config import Config, ConfigError, config_to_dict

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


def import_wandb():
    """The wandb module, or an error naming the key that asked for it
    (`check_job` calls this before anything starts)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("run.wandb_project is set but wandb is not installed: pip install 'stream-rl[wandb]' "
                          "(the wandb extra), or leave run.wandb_project unset") from None
    return wandb


def scalars(record: dict) -> dict:
    """The record's numbers (booleans as 0/1), without `step`, which W&B
    takes as its own step; None, strings and lists are left to the JSONL."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


class WandbRun:
    """The job's W&B run: started with the job's config, a record per step
    at the record's step, finished at the end. A failure while logging is
    warned about once and ends W&B logging, never the job: the JSONL is the
    record."""

    def __init__(self, cfg: Config, out_dir: Path, resumed: bool):
        wandb = import_wandb()
        rc = cfg.run
        id_file = out_dir / RUN_ID_FILE
        # A resumed job continues its W&B run; a fresh one in the same OUT
        # starts another (its steps begin again at 1).
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        try:
            self._run = wandb.init(project=rc.wandb_project, entity=rc.wandb_entity,
                                   name=rc.wandb_name or out_dir.resolve().name, dir=str(out_dir),
                                   mode=rc.wandb_mode, config=config_to_dict(cfg),
                                   id=run_id, resume="allow" if run_id else None)
        except Exception as err:
            raise RuntimeError(f"run.wandb_project {rc.wandb_project!r}: W&B could not start the run "
                               f"({type(err).__name__}: {err}); run.wandb_mode=offline logs without the "
                               f"network, for `wandb sync` later") from err
        id_file.write_text(self._run.id)

    def log(self, record: dict) -> None:
        if self._run is None:
            return
        try:
            self._run.log(scalars(record), step=record["step"])
        except Exception as err:
            log.warning("W&B logging failed at step %s (%s: %s); W&B logging stops here, OUT/metrics.jsonl "
                        "goes on", record.get("step"), type(err).__name__, err)
            self._abandon()

    def close(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as err:
            log.warning("W&B could not finish the run (%s: %s)", type(err).__name__, err)
        self._run = None

    def _abandon(self) -> None:
        try:
            self._run.finish(exit_code=1)
        except Exception:  # already broken; the warning has been given
            pass
        self._run = None
