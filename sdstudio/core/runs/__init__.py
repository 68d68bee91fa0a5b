"""Run folders: ``RunFolder`` (folder.py) knows where every file of a run lies and answers questions about it
(its checkpoints, the newest valid and the best one, samples, metrics curves, lock, config snapshot);
checkpoints.py reads and verifies checkpoint folders; metrics.py appends and reads metrics.jsonl and turns it
into smoothed curves; lock.py keeps one writer per folder."""

from .checkpoints import CheckpointInfo, newest_valid_checkpoint, verify_checkpoint
from .folder import (
    BEST_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EXPORTS_DIR,
    LOG_FILE,
    METRICS_FILE,
    SAMPLES_DIR,
    RunFolder,
    close_run_log,
    default_run_dir,
    is_run_dir,
    list_runs,
    load_run_config,
    open_run_log,
    prepare_new_run_dir,
    resolve_checkpoint,
    run_of_checkpoint,
    save_run_config,
)
from .lock import LOCK_FILE, RunLock, pid_alive
from .metrics import (
    SMOOTHING,
    EmaSmoother,
    MetricsWriter,
    RunCurves,
    curves_from_rows,
    metrics_row,
    read_curves,
    read_metrics,
    smooth_ema,
    truncate_metrics_after,
)

__all__ = [
    "BEST_FILE", "CHECKPOINTS_DIR", "CONFIG_FILE", "EXPORTS_DIR", "LOCK_FILE", "LOG_FILE", "METRICS_FILE",
    "SAMPLES_DIR", "SMOOTHING", "CheckpointInfo", "EmaSmoother", "MetricsWriter", "RunCurves", "RunFolder",
    "RunLock", "close_run_log", "curves_from_rows", "default_run_dir", "is_run_dir", "list_runs",
    "load_run_config", "metrics_row", "newest_valid_checkpoint", "open_run_log", "pid_alive",
    "prepare_new_run_dir", "read_curves", "read_metrics", "resolve_checkpoint", "run_of_checkpoint",
    "save_run_config", "smooth_ema", "truncate_metrics_after", "verify_checkpoint",
]
