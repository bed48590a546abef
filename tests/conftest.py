"""Shared fixtures.  MPI tests are marked ``@pytest.mark.mpi`` (pytest-mpi) and run under
``mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi``; plain ``pytest`` skips them."""
import torch

torch.set_num_threads(1)
