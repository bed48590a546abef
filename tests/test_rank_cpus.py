"""Each controlled rank pins to its own block of its host's CPUs (before: every edge took CPUs 0..cores-1)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduling.controller import Controller, rank_cpus


@given(st.sets(st.integers(0, 127), min_size=1, max_size=64), st.integers(1, 8), st.data())
@settings(max_examples=300, deadline=None)
def test_blocks_are_disjoint_whenever_the_host_has_the_cpus(machine, slots, data):
    cores = data.draw(st.integers(1, len(machine)))
    picks = [rank_cpus(sorted(machine, reverse=True), cores, slot, slots) for slot in range(slots)]
    for cpus, _ in picks:
        assert len(cpus) == len(set(cpus)) == cores and set(cpus) <= machine
    fits = cores * slots <= len(machine)
    assert all(disjoint == fits for _, disjoint in picks)
    if fits:  # brute force: no CPU in two ranks' sets
        seen = [c for cpus, _ in picks for c in cpus]
        assert len(seen) == len(set(seen))


@pytest.mark.mpi(min_size=2)
def test_ranks_on_one_host_pin_to_their_own_cpus_as_the_os_reports(world, agree):
    from launch.ranks import controlled_cpus
    from runtime import transport

    cores = 1
    cpus = controlled_cpus(world, cores)
    ctl = Controller("priority", cores, 2, cpus=cpus)
    try:
        ctl.apply(ctl.waiting())  # every thread of this process onto its cpus
        pinned = sorted(os.sched_getaffinity(0))
    finally:
        ctl.restore()
    everyone = transport.allgather_objects(world, pinned)
    machine = len(os.sched_getaffinity(0))
    problems = [] if pinned == cpus else [f"rank {world.rank}: the OS says {pinned}, the controller chose {cpus}"]
    if machine >= world.size and world.rank == 0:
        flat = [c for p in everyone for c in p]
        if len(flat) != len(set(flat)):
            problems.append(f"ranks share CPUs although the host has {machine}: {everyone}")
    agree(world, problems)
