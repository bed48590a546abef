"""Topology files and the rank map: generated topologies against a map built here from the generator's
own description (no code under test), every bad input as one UsageError naming the file and host/line."""
import random
from pathlib import Path

import pytest

from launch.topology import check_world_size, load_topology, parse_topology
from runtime.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "hostfiles").glob("*.toml"))


def host_toml(name, role, cluster=None, speed=None, slots=None, address=None) -> str:
    lines = ["[[host]]", f'name = "{name}"', f'role = "{role}"']
    if cluster is not None:
        lines.append(f'cluster = {cluster}' if isinstance(cluster, int) else f'cluster = "{cluster}"')
    if speed is not None:
        lines.append(f"speed = {speed}" if not isinstance(speed, str) else f'speed = "{speed}"')
    if slots is not None:
        lines.append(f"slots = {slots}")
    if address is not None:
        lines.append(f'address = "{address}"')
    return "\n".join(lines) + "\n"


def random_topology(rng: random.Random):
    """(TOML text, expected[(cluster, stage)] = (host name, slot), speeds by name, slots by name, addresses).

    Clusters get S devices split into hosts of random slot counts; hosts are
    interleaved across clusters with each cluster's workers in order and its
    master anywhere among them; the cloud anywhere.  The expected map follows
    the contract: clusters by first appearance, master's slots first, then the
    workers' in file order.
    """
    clusters, stages = rng.randint(1, 4), rng.randint(1, 6)
    pool = ["localhost", "node-a", "node-b", "10.0.0.7"]
    keys = rng.sample([0, 1, 2, 3, 7, "north", "south", "x"], clusters)
    per_cluster, speeds, slots, addresses = [], {}, {}, {}
    counter = 0
    for c, key in enumerate(keys):
        m_slots = rng.randint(1, stages)
        left, workers = stages - m_slots, []
        while left:
            n = rng.randint(1, left)
            workers.append(n)
            left -= n
        entries = []
        for role, n in [("master", m_slots)] + [("worker", n) for n in workers]:
            name = f"h{counter}"
            counter += 1
            speed = rng.choice([None, 0.5, 1, 2.5])
            speeds[name] = 1.0 if speed is None else float(speed)
            slots[name] = n
            address = rng.choice([None, *pool])
            addresses[name] = address or name
            entries.append((role, host_toml(name, role, key, speed, n if n > 1 or rng.random() < 0.5 else None,
                                            address), name))
        master, others = entries[0], entries[1:]
        others.insert(rng.randint(0, len(others)), master)
        per_cluster.append(others)
    # interleave: repeatedly take the next entry of a random cluster
    order, cursors = [], [0] * clusters
    while any(cursors[c] < len(per_cluster[c]) for c in range(clusters)):
        c = rng.choice([c for c in range(clusters) if cursors[c] < len(per_cluster[c])])
        order.append((c, per_cluster[c][cursors[c]]))
        cursors[c] += 1
    first_seen = []
    for c, _ in order:
        if c not in first_seen:
            first_seen.append(c)
    expected = {}
    for ci, c in enumerate(first_seen):
        entries = [e for cc, e in order if cc == c]
        master = next(e for e in entries if e[0] == "master")
        seq = [(master[2], k) for k in range(slots[master[2]])]
        seq += [(e[2], k) for e in entries if e[0] == "worker" for k in range(slots[e[2]])]
        assert len(seq) == stages
        for s, dev in enumerate(seq):
            expected[(ci, s)] = dev
    texts = [e[1] for _, e in order]
    if rng.random() < 0.5:
        texts.insert(rng.randint(0, len(texts)), host_toml("cloud-pc", "cloud", address=rng.choice(pool)))
    return "\n".join(texts), expected, speeds, slots, addresses, clusters, stages


def test_rank_map_of_generated_topologies_follows_the_contract():
    rng = random.Random(13)
    for trial in range(300):
        text, expected, speeds, slots, addresses, clusters, stages = random_topology(rng)
        t = parse_topology(text, f"gen-{trial}.toml")
        assert (t.clusters, t.stages, t.size) == (clusters, stages, clusters * stages), text
        ranks = t.ranks()
        assert [r.rank for r in ranks] == list(range(clusters * stages))  # a bijection onto 0..P-1
        assert len({(r.cluster, r.stage) for r in ranks}) == len(ranks)
        for r in ranks:
            assert r.rank == r.cluster * stages + r.stage
            assert (r.host, r.slot) == expected[(r.cluster, r.stage)], text
            assert r.role == ("master" if r.stage == 0 else "worker")
            assert r.speed == speeds[r.host] and r.address == addresses[r.host]
            assert t.rank_of(r.cluster, r.stage) == r.rank
        assert ranks[0].cluster == 0 and ranks[0].stage == 0 and ranks[0].role == "master"
        for name, n in slots.items():  # every host holds exactly as many ranks as it has slots
            assert sum(r.host == name for r in ranks) == n
        for c in range(clusters):
            assert t.cluster_ranks(c) == [c * stages + s for s in range(stages)]
            want = sum(speeds[expected[(c, s)][0]] for s in range(stages))
            assert t.cluster_speeds()[c] == pytest.approx(want)
        for s in range(stages):
            assert t.stage_ranks(s) == [c * stages + s for c in range(clusters)]
        if t.cloud is not None:
            assert t.cloud_rank == t.size and t.world_size(with_cloud=True) == t.size + 1
            last = t.ranks(with_cloud=True)[-1]
            assert (last.rank, last.host, last.role, last.cluster, last.stage) == (t.size, "cloud-pc", "cloud",
                                                                                 None, None)
            assert t.ranks(with_cloud=True)[:-1] == ranks  # device ranks the same with or without the cloud
        else:
            assert t.cloud_rank is None and t.world_size(with_cloud=True) == t.size


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_topologies_load(path):
    t = load_topology(path)
    assert t.size == t.clusters * t.stages and t.ranks()[0].role == "master"


def test_the_paper_testbed_and_the_fig10_variant():
    t = load_topology(REPO / "hostfiles" / "testbed.toml")
    assert (t.clusters, t.stages, t.size, t.cloud.name, t.cloud_rank) == (3, 5, 15, "pc", 15)
    assert [r.host for r in t.ranks(with_cloud=True)] == (
        ["jetson-0", "pi-0", "pi-1", "pi-2", "pi-3", "jetson-1", "pi-4", "pi-5", "pi-6", "pi-7",
         "jetson-2", "pi-8", "pi-9", "pi-10", "pi-11", "pc"])
    assert t.stage_ranks(0) == [0, 5, 10] and t.cluster_speeds() == [6.0, 6.0, 6.0]
    two = load_topology(REPO / "hostfiles" / "testbed-2clusters.toml")
    assert (two.clusters, two.stages, two.size) == (2, 5, 10)


def test_localhost_topologies_cover_2_3_4_and_8_ranks_and_uneven_speeds():
    shapes = {}
    for name in ("local-2x1", "local-1x2", "local-2x2", "local-3x1", "local-2x4"):
        t = load_topology(REPO / "hostfiles" / f"{name}.toml")
        assert all(r.address == "localhost" for r in t.ranks(with_cloud=True))
        shapes[name] = (t.clusters, t.stages)
        assert f"{t.clusters}x{t.stages}" in name
    assert {c * s for c, s in shapes.values()} >= {2, 3, 4, 8}
    assert load_topology(REPO / "hostfiles" / "local-3x1.toml").cluster_speeds() == [2.0, 1.0, 1.0]
    assert [r.speed for r in load_topology(REPO / "hostfiles" / "local-1x2.toml").ranks()] == [2.0, 1.0]


def test_measure_needs_a_measurement():
    text = host_toml("j", "master", 0, "measure") + host_toml("p", "worker", 0, 1.5)
    t = parse_topology(text, "m.toml")
    assert t.ranks()[0].speed is None
    with pytest.raises(UsageError, match=r"m.toml: speed of j is \"measure\".*run 'aflkd profile'"):
        t.cluster_speeds()
    assert t.cluster_speeds({"j": 2.0}) == [3.5]
    assert t.with_speeds({"j": 2.0, "p": 1.0}).cluster_speeds() == [3.0]
    with pytest.raises(UsageError, match="measured speeds name hosts the topology does not have: q"):
        t.cluster_speeds({"q": 1.0})
    with pytest.raises(UsageError, match="measured speed of j must be a number > 0"):
        t.cluster_speeds({"j": 0.0})


M, W = host_toml("j0", "master", 0), host_toml("p0", "worker", 0)


@pytest.mark.parametrize("text, message", [
    ("", r"bad.toml: no cluster devices; add at least one \[\[host\]\] with role = \"master\""),
    (host_toml("pc", "cloud"), "bad.toml: no cluster devices"),
    ("[[host]]\nname = \"a\"\nrole = \"master\"\ncluster = 0\nspeed = \n",
     r"bad.toml: not valid TOML: .*\(at line 5, column 9\)"),
    ("[[host]\n", r"bad.toml: not valid TOML: .*line 1"),
    (M + host_toml("x", "boss", 0), r"bad.toml, host #2 \('x'\): role must be one of cloud, master, worker, got 'boss'"),
    (M + W + host_toml("p1", "worker", 1), r"bad.toml: cluster 1 has no master \(hosts p1\); give one of its hosts"),
    (M + host_toml("j1", "master", 0), r"bad.toml: cluster 0 has 2 masters \(j0, j1\); a cluster has exactly one"),
    (M + host_toml("p", "worker", 0, slots=0), r"bad.toml, host #2 \('p'\): slots must be an integer >= 1.*got 0"),
    (M + host_toml("p", "worker", 0, slots="true").replace('"true"', "true"), r"host #2 \('p'\): slots must be"),
    (M + host_toml("p", "worker", 0, slots=99999999999999999999), r"host #2 \(.p.\): slots = 99999999999999999999 is more"),
    (M + host_toml("p", "worker", 0, slots=1025), r"slots = 1025 is more devices than one host holds \(at most 1024\)"),
    (M + host_toml("j0", "worker", 0), r"bad.toml: host name 'j0' is used by host #1 and host #2; names must be unique"),
    (M + host_toml("p", "worker", 0, speed=0), r"bad.toml, host #2 \('p'\): speed must be a number > 0 or \"measure\""),
    (M + host_toml("p", "worker", 0, speed=-1.5), r"speed must be a number > 0"),
    (M + host_toml("p", "worker", 0, speed="fast"), r"speed must be a number > 0 or \"measure\", got 'fast'"),
    (M + W + host_toml("j1", "master", 1),
     r"bad.toml: clusters have different numbers of devices \(cluster 0: 2, cluster 1: 1\); the pipeline runs the "
     r"same number of stages in every cluster"),
    (M + host_toml("p", "worker"), r"bad.toml, host #2 \('p'\): a worker needs cluster = <integer or name>"),
    (M + host_toml("pc", "cloud", 0), r"host #2 \('pc'\): the cloud belongs to no cluster"),
    (M + host_toml("pc", "cloud", slots=2), r"the cloud is one rank"),
    (M + host_toml("c1", "cloud") + host_toml("c2", "cloud"), r"bad.toml: 2 cloud hosts \(c1, c2\)"),
    (M + "[[host]]\nname = \"p\"\nrole = \"worker\"\ncluster = 0\nspedd = 2\n",
     r"bad.toml, host #2 \('p'\): unknown key 'spedd'"),
    ("hosts = 1\n" + M, r"bad.toml: unknown top-level key 'hosts'"),
    ("host = 1\n", r"bad.toml: 'host' must be an array of tables"),
    (M + host_toml("p", "worker", 0, address="a b"), r"host #2 \('p'\): address must be a host name"),
    (M + host_toml("p", "worker", 0, address="fe80::1"), r"address must be .* without spaces, '#', '=' or ':'"),
    (host_toml("has space", "master", 0), r"host #1 \('has space'\): name must be a non-empty string without spaces"),
    ("[[host]]\nrole = \"master\"\ncluster = 0\n", r"bad.toml, host #1: name must be"),
    (M.replace("cluster = 0", "cluster = 1.5"), r"cluster must be an integer or a non-empty name, got 1.5"),
])
def test_bad_topology_is_one_usage_error_naming_file_and_host(text, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_topology(text, "bad.toml")
    assert "\n" not in str(err.value)


def test_missing_file_and_binary_file(tmp_path):
    with pytest.raises(UsageError, match=r"topology file .*nope.toml not found \(shipped ones are in hostfiles"):
        load_topology(tmp_path / "nope.toml")
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        load_topology(tmp_path / "b.toml")


def test_cluster_keys_keep_file_order_and_0_is_the_same_as_quoted_0():
    text = host_toml("b", "master", "z") + host_toml("a", "master", 0) + host_toml("c", "worker", "0") \
        + host_toml("d", "worker", "z")
    t = parse_topology(text, "k.toml")
    assert t.cluster_names == ("z", "0") and [r.host for r in t.ranks()] == ["b", "d", "a", "c"]


def test_world_size_mismatch_names_both_numbers_and_the_fix():
    t = load_topology(REPO / "hostfiles" / "local-2x2.toml")
    check_world_size(t, 4)
    check_world_size(t, 5, with_cloud=True)
    with pytest.raises(UsageError, match=r"this job has 3 ranks but .*local-2x2.toml has 4 \(devices; the cloud is "
                                         r"not a rank of it\); run it with mpiexec -n 4, or use 'aflkd launch"):
        check_world_size(t, 3)
    with pytest.raises(UsageError, match=r"has 5 \(devices plus the cloud\)"):
        check_world_size(t, 4, with_cloud=True)
