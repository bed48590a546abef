class _Missing(type):
    """A class for every name asked of the stand-in: usable in annotations and dicts; calling it fails."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"mpi4py is not installed here: {cls.__name__} called (results/converged stand-in)")


_made = {}


def missing(module, name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _made.setdefault(f"{module}.{name}", _Missing(f"{module}.{name}", (), {}))
