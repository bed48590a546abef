"""Hostfiles: both syntaxes read and written, round trips, placement by slot against the rank map of
generated topologies, each MPI's rule for a repeated host, bad lines named by file and line."""
import random
from pathlib import Path

import pytest

from launch.hostfile import (check_hostfile, hostfile_lines, parse_hostfile, placement, rank_runs, read_hostfile,
                             write_hostfile)
from launch.topology import load_topology, parse_topology
from runtime.errors import UsageError
from tests.test_topology import host_toml, random_topology

REPO = Path(__file__).resolve().parent.parent


def pairs(hostfile):
    return [(e.host, e.slots) for e in hostfile.entries]


def test_round_trip_of_random_host_lists_in_both_syntaxes():
    rng = random.Random(5)
    for _ in range(200):
        hosts = [(rng.choice(["a", "b-1", "node.lan", "10.0.0.3", "user@pi-4"]), rng.randint(1, 64))
                 for _ in range(rng.randint(1, 8))]
        ompi = "\n".join(["# a comment", ""] + [f"{h} slots={n}" + (f" max_slots={n + 2}" if n % 3 == 0 else "")
                                                + ("   # trailing" if n % 5 == 0 else "") for h, n in hosts])
        hydra = "\n".join(["", "# a comment"] + [f"{h}:{n}" for h, n in hosts]) + "\n"
        parsed_o, parsed_h = parse_hostfile(ompi, "o"), parse_hostfile(hydra, "h")
        assert pairs(parsed_o) == hosts and parsed_o.flavour == "openmpi"
        assert pairs(parsed_h) == hosts and parsed_h.flavour == "mpich"
        assert [e.max_slots for e in parsed_o.entries] == [n + 2 if n % 3 == 0 else None for _, n in hosts]
        assert [e.line for e in parsed_h.entries] == list(range(3, 3 + len(hosts)))


def test_written_hostfiles_read_back_place_every_rank_on_its_address(tmp_path):
    """Generated topologies: write, read, place by slot, compare with the rank map's addresses."""
    rng = random.Random(29)
    refused = 0
    for trial in range(150):
        text = random_topology(rng)[0]
        t = parse_topology(text, f"gen-{trial}.toml")
        for with_cloud in (False, True):
            want = [r.address for r in t.ranks(with_cloud)]
            runs = []  # runs of consecutive equal addresses, counted here
            for a in want:
                if runs and runs[-1][0] == a:
                    runs[-1][1] += 1
                else:
                    runs.append([a, 1])
            repeated = len({a for a, _ in runs}) < len(runs)
            for flavour in ("mpich", "openmpi"):
                if flavour == "openmpi" and repeated:
                    with pytest.raises(UsageError, match="Open MPI hostfiles cannot express that order"):
                        hostfile_lines(t, flavour, with_cloud)
                    refused += 1
                    continue
                path = write_hostfile(tmp_path / f"{trial}-{flavour}.hosts", t, flavour, with_cloud)
                back = read_hostfile(path, flavour)
                assert pairs(back) == [tuple(r) for r in runs]
                assert placement(back, len(want)) == want
                check_hostfile(t, back, with_cloud=with_cloud)
                assert read_hostfile(path).flavour == flavour  # the syntax says which
    assert refused > 0  # the generator does make orders Open MPI cannot express


def test_hydra_keeps_a_repeated_host_in_place_open_mpi_refuses_it():
    hydra = parse_hostfile("a:1\nb:1\na:1\n", "h")
    assert placement(hydra, 3) == ["a", "b", "a"]  # as MPICH 5.0.2 placed them (PMI_HOSTNAME per rank)
    ompi = parse_hostfile("a slots=1\nb slots=1\na slots=1\n", "o")
    with pytest.raises(UsageError, match=r"o line 3: a is already on line 1; Open MPI merges \(4.x\) or refuses"):
        placement(ompi, 3)
    assert rank_runs(["a", "a", "b", "a"]) == [("a", 2), ("b", 1), ("a", 1)]


def test_lines_of_the_testbed_and_a_localhost_topology():
    t = load_topology(REPO / "hostfiles" / "testbed.toml")
    body = [line for line in hostfile_lines(t, "mpich") if not line.startswith("#")]
    assert body == ["jetson-0:1", "pi-0:1", "pi-1:1", "pi-2:1", "pi-3:1", "jetson-1:1", "pi-4:1", "pi-5:1",
                    "pi-6:1", "pi-7:1", "jetson-2:1", "pi-8:1", "pi-9:1", "pi-10:1", "pi-11:1"]
    assert [line for line in hostfile_lines(t, "openmpi", with_cloud=True) if not line.startswith("#")][-1] \
        == "pc slots=1"
    local = load_topology(REPO / "hostfiles" / "local-2x4.toml")
    assert [line for line in hostfile_lines(local, "openmpi") if not line.startswith("#")] == ["localhost slots=8"]
    assert "# ranks 0-7: m0, w0, w0[1], w0[2], m1, w1, w1[1], w1[2]" in hostfile_lines(local, "mpich")


def test_shipped_rack_hostfiles_still_parse():
    mpich = read_hostfile(REPO / "hostfiles" / "rack-mpich.hosts", "mpich")
    ompi = read_hostfile(REPO / "hostfiles" / "rack-openmpi.hosts", "openmpi")
    assert pairs(mpich) == pairs(ompi) == [("jetson-0", 1), ("pi-0", 1), ("pi-1", 1)]


@pytest.mark.parametrize("text, flavour, message", [
    ("a:1\nb slots=2\n", "auto", r"f.hosts: mixes MPICH 'host:N' \(line 1\) and Open MPI 'slots=' \(line 2\)"),
    ("a:x\n", "auto", r"f.hosts line 1: cannot read 'a:x'; MPICH lines are host:N with N >= 1"),
    ("a:0\n", "auto", "f.hosts line 1: cannot read 'a:0'"),
    ("# c\n\na:2 b\n", "auto", r"f.hosts line 3: cannot read 'a:2 b'"),
    ("a:2 # two\n", "auto", r"f.hosts line 1: a comment after the host .*MPICH's Hydra refuses it"),
    ("a # one\n", "mpich", r"f.hosts line 1: a comment after the host"),
    ("a slots=two\n", "auto", r"f.hosts line 1: cannot read 'slots=two'; Open MPI lines are 'host slots=N"),
    ("a\nb sluts=2\n", "auto", r"f.hosts line 2: cannot read 'sluts=2'"),
    ("a slots=0\n", "auto", r"f.hosts line 1: slots must be >= 1, got 0"),
    ("a slots=4 max_slots=2\n", "auto", r"f.hosts line 1: max_slots=2 is below slots=4"),
    ("slots=2\n", "auto", r"f.hosts line 1: cannot read 'slots=2'; a line starts with a host name"),
    ("a slots=2\n", "mpich", r"f.hosts line 1: openmpi syntax in a mpich hostfile; write 'host:N'"),
    ("a:2\n", "openmpi", r"f.hosts line 1: mpich syntax in a openmpi hostfile; write 'host slots=N'"),
    ("a:1\n", "lam", "hostfile flavour must be openmpi, mpich or auto"),
])
def test_bad_hostfile_line_is_one_usage_error_with_file_and_line(text, flavour, message):
    with pytest.raises(UsageError, match=message):
        parse_hostfile(text, "f.hosts", flavour)


def test_check_against_a_topology_unknown_host_too_few_slots_wrong_order(tmp_path):
    t = parse_topology(host_toml("j", "master", 0) + host_toml("p", "worker", 0, slots=2), "t.toml")
    check_hostfile(t, parse_hostfile("j:1\np:2\n", "ok"))
    check_hostfile(t, parse_hostfile("j slots=1\np slots=4 max_slots=8\n", "roomy"))  # spare slots are fine
    with pytest.raises(UsageError, match=r"x line 2: host q runs no rank of t.toml \(its ranks run on j, p\)"):
        check_hostfile(t, parse_hostfile("j:1\nq:2\n", "x"))
    with pytest.raises(UsageError, match=r"x: p has 1 slots but t.toml puts 2 ranks on it; give it slots=2"):
        check_hostfile(t, parse_hostfile("j:1\np:1\n", "x"))
    with pytest.raises(UsageError, match=r"x: j has 0 slots .* \(missing: add a line\)"):
        check_hostfile(t, parse_hostfile("p:3\n", "x"))
    with pytest.raises(UsageError, match=r"x: rank 0 would run on p but t.toml puts it on j \(j\); order the lines"):
        check_hostfile(t, parse_hostfile("p:2\nj:1\n", "x"))
    with pytest.raises(UsageError, match=r"x has 2 slots for 3 ranks"):
        placement(parse_hostfile("j:1\np:1\n", "x"), 3)
    with pytest.raises(UsageError, match=r"hostfile .*none.hosts not found"):
        read_hostfile(tmp_path / "none.hosts")
