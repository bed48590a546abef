from .._missing import missing


def __getattr__(name):
    return missing("dtlib", name)
