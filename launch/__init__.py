"""Command line, hostfiles, topology and mpirun helpers."""
