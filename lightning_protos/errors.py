"""Errors raised for bad input; the CLI prints them as one line before any training."""


class ProtosError(ValueError):
    """A bad argument, data set or shape; its message is one line."""


def check_positive(**values: float | None) -> None:
    """One-line error for a non-positive learning rate, temperature, weight ... (``None``, an
    option left unset, passes)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ProtosError(f"{name} must be > 0, got {value}")


def check_non_negative(**values: float | None) -> None:
    """One-line error for a negative weight, count or noise level (``None`` passes)."""
    for name, value in values.items():
        if value is not None and not value >= 0:
            raise ProtosError(f"{name} must be >= 0, got {value}")


def check_widths(name: str, widths) -> None:
    """One-line error for a layer width or channel count below 1 in the list ``name``."""
    for i, width in enumerate(widths):
        if not width >= 1:
            raise ProtosError(f"{name} {list(widths)}: {width} at position {i} is below 1")


def check_choices(**choices: tuple[object, tuple[str, ...]]) -> None:
    """One-line error for an option outside its choices: ``name=(value, allowed)``."""
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ProtosError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
