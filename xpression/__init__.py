"""X-Pression: 3D gene-expression programs across micro-CT volumes from one 2D ST section.

Importing the package has no side effects: the config resolvers ``conf/`` uses are registered
by the entry points (``xpression.resolvers.register_resolvers``)."""
