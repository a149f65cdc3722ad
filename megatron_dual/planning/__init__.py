"""Choosing alpha: the paper's rules of thumb, layout realisation, the GP surface over (repetitions, alpha), and
sweeps that produce a user's own surface. See tools/plan_alpha.py and tools/sweep.py."""
