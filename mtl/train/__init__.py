"""Training: jitted sharded steps, the loop behind ``mtl train``, baselines and Δm%."""
from mtl.train.baselines import run_experiment
from mtl.train.loop import NonFiniteLossError, WorkdirConflictError, run
from mtl.train.optimizer import make_optimizer
from mtl.train.results import DELTA_M_DEFINITION, delta_m, format_results_table
from mtl.train.step import Steps, TrainState, task_losses
