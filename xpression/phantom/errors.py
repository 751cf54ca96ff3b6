"""Errors raised by the phantom generator."""


class PhantomError(ValueError):
    """Invalid phantom parameters or output location; the message names the problem."""
