"""Synthetic X-Pression cohorts: analytic lung-like tissue, micro-CT volumes, Visium sections.

Public entry points: generate_cohort (also `python -m xpression.phantom`), Phantom (the
3D truth), PhantomError.
"""

from .cohort import generate_cohort, program_field
from .errors import PhantomError
from .phantom import Phantom
from .presets import PRESETS
from .programs import PROGRAMS

__all__ = ["generate_cohort", "Phantom", "PhantomError", "PRESETS", "PROGRAMS", "program_field"]
