"""Strong and weak scaling studies: plan Slurm jobs, run them locally, report and model.

A study lives in one folder::

    DIR/manifest.json          the points (one per rank count) and how to run them
    DIR/train.sbatch           a copy of slurm/train.sbatch, which every point script runs
    DIR/{kind}-{P}r-{M}n.sbatch one Slurm batch script per point, from
                               slurm/scaling-point.sbatch.in
    DIR/data/*_train.h5        the datasets the points need (N samples each)
    DIR/runs/{name}/           each point's training output (summary.json, metrics.jsonl, ...)
    DIR/logs/                  Slurm and local-run logs
    DIR/scaling.csv, model.json, scaling-{kind}.png   written by the report

One module per job: :mod:`~padmmirnn.scaling.manifest` holds the points every other
module reads, :mod:`~padmmirnn.scaling.planning` writes the study (datasets,
batch scripts, manifest), :mod:`~padmmirnn.scaling.run` runs its points here with
mpiexec, :mod:`~padmmirnn.scaling.measure` reads their timings back,
:mod:`~padmmirnn.scaling.model` fits the communication model and projects it,
:mod:`~padmmirnn.scaling.reporting` writes the CSV, the model and the Markdown summary,
and :mod:`~padmmirnn.scaling.plots` draws the speedup and efficiency plots.
"""

from padmmirnn.scaling.manifest import Point
from padmmirnn.scaling.measure import Measured, iteration_timings
from padmmirnn.scaling.model import Model, fit_model
from padmmirnn.scaling.planning import PlanOptions, plan
from padmmirnn.scaling.reporting import CSV_COLUMNS, report
from padmmirnn.scaling.run import run_points

__all__ = ["CSV_COLUMNS", "Measured", "Model", "PlanOptions", "Point", "fit_model",
           "iteration_timings", "plan", "report", "run_points"]
