"""ASHA early stopping whose rungs survive a resumed sweep.

Tune saves a sweep's trials and search state, not its scheduler's: `Tuner.restore` starts ASHA with empty rungs,
so the trials that ran before the interruption are never compared against, and whether a later trial is stopped
depends on where the sweep was cut. Each trial of a sweep is a training run at `<train_root>/<trial id>` that
keeps its epoch records (the summary once finished, else its last checkpoint); when Tune (re-)adds a trial, its
records are put back into its bracket, values only, as ASHA saw them when they were reported.
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler

from pipeline.store import storage


class ResumableASHA(ASHAScheduler):
    def __init__(self, train_root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_root = train_root

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        from pipeline.train.summary import recorded_history

        bracket = self._trial_info[trial.trial_id]
        run_dir = storage.join(self.train_root, trial.trial_id)
        try:
            history = recorded_history(run_dir)
        except Exception as e:
            # The trial itself will meet the same file and fail naming it; the rest of the sweep goes on.
            print(
                f"[tune] ASHA: the records of trial {trial.trial_id} at {run_dir} could not be read "
                f"({type(e).__name__}: {e}); its earlier results are not in the rungs",
                flush=True,
            )
            return
        epochs = []
        for record in history:
            if self._time_attr in record and self._metric in record:
                bracket.on_result(trial, record[self._time_attr], self._metric_op * record[self._metric])
                epochs.append(record[self._time_attr])
        if epochs:
            print(
                f"[tune] ASHA: trial {trial.trial_id} comes back with its results of {self._time_attr} "
                f"{epochs[0]}–{epochs[-1]} in its rungs",
                flush=True,
            )
