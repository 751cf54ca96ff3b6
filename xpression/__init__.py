"""X-Pression: 3D gene-expression programs across micro-CT volumes from one 2D ST section."""

from xpression.resolvers import register_resolvers

register_resolvers()
