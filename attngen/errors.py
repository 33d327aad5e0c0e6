"""Errors that speak to the person who wrote the spec."""


class AttngenError(Exception):
    """Base class for every error attngen raises on purpose."""


class SpecError(AttngenError):
    """A spec is malformed: names the file, the field and what is allowed.

    >>> str(SpecError("specs/x.yaml", "mask.window.left", "expected a non-negative integer, got -3"))
    'specs/x.yaml: mask.window.left: expected a non-negative integer, got -3'
    """

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field, self.message = source, field, message
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")


class IRError(AttngenError):
    """The IR broke an invariant; names the node (a compiler bug, not a user error)."""


class TilingError(AttngenError):
    """A tile configuration is illegal for the target; says why."""
