"""The learning-rate schedule: linear warmup, then step decay or cosine.

``lr_at(solver_cfg, it)`` is a pure function of the iteration, so a resumed run continues the
schedule exactly where it stopped (no scheduler state to save).
"""
import math


def warmup_factor_at(solver, it):
    """Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters`` iterations."""
    if solver.warmup_iters <= 0 or it >= solver.warmup_iters:
        return 1.0
    alpha = it / float(solver.warmup_iters)
    return solver.warmup_factor * (1.0 - alpha) + alpha


def lr_at(solver, it):
    """Learning rate of iteration ``it``.

    Args:
        solver: ``cfg.solver`` (``base_lr``, ``warmup_iters``, ``warmup_factor``,
            ``lr_schedule`` ``step`` or ``cosine``, ``steps``, ``gamma``, ``max_iter``).
        it (int): the 0-based iteration.

    Returns:
        float: ``base_lr`` times the warmup factor, times ``gamma`` per passed step, or times
        the cosine factor ``0.5 * (1 + cos(pi * it / max_iter))``.
    """
    base = solver.base_lr * warmup_factor_at(solver, it)
    if solver.lr_schedule == "cosine":
        progress = min(1.0, it / float(max(1, solver.max_iter)))
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    decays = sum(1 for step in solver.steps if it >= step)
    return base * (solver.gamma ** decays)
