from ._missing import missing


def Is_initialized():
    return False


def Is_finalized():
    return False


def __getattr__(name):
    return missing("MPI", name)
