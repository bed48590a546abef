"""Stand-in for mpi4py on a lent GPU machine without it (put on PYTHONPATH by results/converged/gpu_*.sh).

runtime/transport.py imports mpi4py at the top; the grids and the teacher training never call MPI, so
importing works here and calling anything in MPI fails with one clear message.
"""
__version__ = "0+stand-in"
