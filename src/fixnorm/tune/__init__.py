"""Tuners: FixNorm's few-trial coordinate search, and Optuna samplers (TPE, random, grid) as baselines.

Every tuner searches a 2-D lattice in log space: (learning rate, classifier norm) for FixNorm,
(learning rate, weight decay) for the weight-decay baselines. A lattice point is a pair of integer
indices; its values are ``center * ratio**index`` on each axis. The study stores the values themselves
(log-scale floats named ``lr``, ``fc_norm`` / ``weight_decay``), so ``study.best_params``, the
dashboard's plots and parameter importances speak the user's units; the search maps them back to
lattice points.

FixNorm's search rests on the paper's two mechanisms: with the scale-invariant weights at fixed
norms, the learning rate alone sets their effective learning rate, and the classifier norm alone
sets the logit scale, so the two axes are close to independent and accuracy is unimodal along
each. A coordinate search then suffices: a line search over log lr at the starting classifier
norm, a line search over log classifier norm at the best lr, then both again with half the step.
Each line search evaluates the centre and one step either side, extends past an edge while the
edge keeps winning, and returns the best point. For SGD + weight decay the two axes are coupled
(the effective learning rate at equilibrium goes as sqrt(lr * wd)), which is why it gets a
generic sampler instead.

Trials live in an Optuna study: SQLite by default, any RDB URL for workers on many machines, or a
journal file (``journal:PATH``, or a path ending ``.log`` / ``.jsonl``) for workers on one machine
or a shared file system. The search is a pure function of the completed trials, so a worker killed
and started again, or several workers sharing a study, continue it without repeating a completed
point. ``CoordinateSampler`` offers the same search to a user's own ``study.optimize``.

The package by job: ``lattice`` (the lattice and the coordinate search, pure), ``samplers`` (Optuna samplers on the
lattice), ``worker`` (the ``Tuner``: storage, locks, heartbeats, ask/tell) and ``objective`` (one engine run per
trial, and the search space from a recipe).
"""
from .lattice import (SECOND_AXIS, TUNERS, Axis, Point, SearchSpace, coordinate_search_best, coordinate_search_next,
                      fitted_point)
from .objective import initial_classifier_norm, run_key, search_space, training_objective
from .samplers import CoordinateSampler
from .worker import Objective, Tuner, TuneResult, _DatabaseLock, _FileLock

__all__ = ["SECOND_AXIS", "TUNERS", "Axis", "CoordinateSampler", "Objective", "Point", "SearchSpace", "TuneResult",
           "Tuner", "coordinate_search_best", "coordinate_search_next", "fitted_point", "initial_classifier_norm",
           "run_key", "search_space", "training_objective", "_DatabaseLock", "_FileLock"]
