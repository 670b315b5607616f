"""Errors raised when weights on disk do not fit the model they are loaded into."""


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded; the message says what was expected and what was found."""


def _listing(names, limit=20):
    names = sorted(names)
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {shown}{more}"


def check_names(component, missing, unexpected):
    """Raise one error listing every missing and unexpected tensor name, if any."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s):{_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s):{_listing(unexpected)}")
    if parts:
        raise WeightLoadError(f"{component}: checkpoint does not match the model architecture.\n" + "\n".join(parts))
