"""Run control: one distillation run from ``start()`` to its terminal state.

Modules (private; the public names are exported by :mod:`foundry_kernel`):

* ``_control``: the run state machine, :class:`RunHandle`, the step-timeout watchdog,
  ``start`` / ``run_sync``;
* ``_job``: the job's phases in order (teacher, data, student, mode preparation,
  distillation, baseline, evaluation, export) and the run's summary;
* ``_resources``: the preflight (memory and disk estimates) and resource sampling.
"""
