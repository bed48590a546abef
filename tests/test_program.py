"""Programs (runtime/program.py) and the in-process transport (runtime/inprocess.py), without MPI.

Every rank's program is lowered from one plan, checked together (pairing, collectives, progress), and run
by the split executor over the in-process transport; the output must equal plain torch.  Broken program
sets must be caught by the check, and by the transport within its deadline.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import build_model
from runtime.graph import trace_model
from runtime.inprocess import run_ranks
from runtime.plan import plan_split
from runtime.program import AllReduce, AwaitHalo, Gather, PostHalo, Reduce, check_programs, lower_all
from runtime.split import SplitExecutor
from runtime.transport import PeerTimeout
from tests.randomgraphs import random_graph
from tests.randomnets import random_config


def _split_output(model, shape, batch, weights, head="gather", timeout_s=20.0, programs=None):
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    plan = plan_split(trace_model(model, shape), weights, head=head)

    def rank(comm):
        executor = SplitExecutor(plan, model, comm)
        if programs is not None:
            executor.program = programs[comm.Get_rank()]
        return executor(x if comm.Get_rank() == 0 else None, batch=batch)

    with torch.no_grad():
        return run_ranks(len(weights), rank, timeout_s=timeout_s)[0], model(x)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), ranks=st.sampled_from([2, 3, 4, 8]), graph=st.booleans())
def test_random_programs_pair_and_equal_plain_torch(seed, ranks, graph):
    model, shape, batch, weights = (random_graph if graph else random_config)(30_000 + seed, ranks)
    plan = plan_split(trace_model(model, shape), weights)
    assert check_programs(lower_all(plan, model)) == []
    got, want = _split_output(model, shape, batch, weights)
    scale = float(want.abs().max()) if graph else 1.0
    assert float((got - want).abs().max()) <= 1e-5 * max(scale, 1e-12)


@pytest.mark.parametrize("name,size,ranks,head", [("edge3", 32, 3, "split"), ("edge1", 32, 4, "gather"),
                                                   ("tv:resnet18", 64, 3, "gather"),
                                                   ("tv:mobilenet_v3_small", 64, 2, "split")])
def test_paper_and_torchvision_nets_in_process_equal_plain_torch(name, size, ranks, head):
    torch.manual_seed(0)
    model = build_model(name, 3, size, 10).eval()
    got, want = _split_output(model, (3, size, size), 2, [1.0 + r for r in range(ranks)], head=head)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def _programs(ranks=3, head="gather"):
    torch.manual_seed(0)
    model = build_model("edge3", 3, 32, 10).eval()
    return model, lower_all(plan_split(trace_model(model, (3, 32, 32)), [1.0] * ranks, head=head), model)


def _replace(programs, rank, index, new):
    p = programs[rank]
    split = list(p.split)
    if new is None:
        del split[index]
    else:
        split[index] = new
    return [dataclasses.replace(p, split=tuple(split)) if q.rank == rank else q for q in programs]


def test_a_removed_receive_is_found_by_the_pairing_check_and_by_the_transport():
    model, programs = _programs()
    i, post = next((i, ins) for i, ins in enumerate(programs[1].split) if isinstance(ins, PostHalo) and ins.recvs)
    lost = post.recvs[0]
    broken = _replace(programs, 1, i, dataclasses.replace(post, recvs=post.recvs[1:]))
    problems = check_programs(broken)
    assert (f"rank {lost.src} sends {lost.rows.described()} of {post.value} to rank 1, which never "
            f"receives them") in problems
    # and run anyway: the receive that is posted nowhere leaves rank 1 with stale rows, the unmatched send
    # is harmless in process, so the output is wrong rather than late -- which is why the check exists
    got, want = _split_output(model, (3, 32, 32), 2, [1.0] * 3, programs=broken)
    assert float((got - want).abs().max()) > 1e-4 * float(want.abs().max())  # ten times the equality bar


def test_a_removed_send_times_out_in_the_transport_instead_of_hanging():
    model, programs = _programs()
    i, post = next((i, ins) for i, ins in enumerate(programs[0].split) if isinstance(ins, PostHalo) and ins.sends)
    broken = _replace(programs, 0, i, dataclasses.replace(post, sends=()))
    assert any("which never sends them" in p for p in check_programs(broken))
    # which rank's wait ends first depends on the load: rank 1 misses rank 0's rows, and its peers then miss its
    with pytest.raises(PeerTimeout, match=r"no message from rank \d+ \(tag \d+\) within 1 s"):
        _split_output(model, (3, 32, 32), 2, [1.0] * 3, timeout_s=1.0, programs=broken)


def test_a_missing_await_and_mismatched_collectives_are_found():
    _, programs = _programs()
    i = next(i for i, ins in enumerate(programs[2].split) if isinstance(ins, AwaitHalo))
    value = programs[2].split[i].value
    assert f"rank 2 receives halo rows of {value} but never awaits them" in check_programs(_replace(programs, 2, i, None))
    # a Gather where the others reduce: named with the collective's position
    _, programs = _programs(head="gather")
    head = list(programs[1].head)
    k = next(k for k, ins in enumerate(head) if isinstance(ins, (Gather, Reduce)))
    head[k] = Gather("relu1_1", 0)
    broken = [dataclasses.replace(p, head=tuple(head)) if p.rank == 1 else p for p in programs]
    assert any(p.startswith("collective") and "rank 1 runs 'Gather     relu1_1" in p for p in check_programs(broken))


def test_an_await_before_the_peer_posts_is_a_deadlock_the_check_names():
    _, programs = _programs(ranks=2)
    split = list(programs[0].split)
    i = next(i for i, ins in enumerate(split) if isinstance(ins, PostHalo) and ins.recvs)
    j = next(j for j in range(i + 1, len(split)) if isinstance(split[j], AwaitHalo) and split[j].value == split[i].value)
    # rank 0 waits for the second value's halo before posting the first's: rank 1 is then stuck too
    k = next(k for k in range(j + 1, len(split)) if isinstance(split[k], AwaitHalo))
    split.insert(i, split.pop(k))
    broken = [dataclasses.replace(programs[0], split=tuple(split)), programs[1]]
    problems = check_programs(broken)
    assert len(problems) == 1 and problems[0].startswith("the programs stop: rank 0 at AwaitHalo")


def test_plan_program_prints_every_rank_and_the_check(capsys):
    from launch.cli import main

    assert main(["plan", "--program", "--net", "edge3", "--size", "32", "--ranks", "3", "--head", "split"]) == 0
    out = capsys.readouterr().out
    assert "rank 2 of 3:" in out and "SplitLinear fc1 <- pool3" in out
    assert out.rstrip().endswith("pairing check of the 3 programs: they pair and run to the end")
    assert main(["plan", "--program", "--ranks", "2", "--rank", "2"]) == 2
    assert "--rank 2: there are only --ranks 2" in capsys.readouterr().err


def test_plan_program_prints_a_pipelines_deployment_and_its_stages(capsys):
    from launch.cli import main

    assert main(["plan", "--program", "--net", "edge3", "--size", "32", "--ranks", "4", "--stages", "2",
                 "--cuts", "12", "--head", "split"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deployment ") and "2 cluster(s) x 2 stage(s), stage cuts [0, 12, 33]" in out
    assert "head split" in out and "SplitLinear" in out
    assert [line.split(" (")[0].split(" transfers")[0] for line in out.splitlines() if line.startswith("job rank")] \
        == [f"job rank {r}" for r in range(4) for _ in range(2)]  # its stage's program, then its transfers
    assert out.rstrip().endswith("pairing check of the 2 stages' programs: they pair and run to the end")
    assert main(["plan", "--program", "--ranks", "4", "--stages", "2", "--cuts", "40"]) == 2
    assert "--cuts: need 1 layer indices" in capsys.readouterr().err
    assert main(["plan", "--program", "--ranks", "3", "--stages", "2"]) == 2
    assert "--stages 2 does not divide --ranks 3" in capsys.readouterr().err


def _local_rows(x, plan, rank):
    rows = plan.input_rows[rank]
    return x[:, :, rows.start:rows.stop].clone(memory_format=torch.channels_last)


@pytest.mark.parametrize("name,size,weights", [("edge3", 32, [1.0, 2.0, 1.5]), ("tv:resnet18", 64, [1.0, 1.0])])
def test_a_pass_without_messages_after_a_real_one_computes_the_same_values(name, size, weights):
    """``forward_local(exchange=False)`` (the benchmark's no-message pass) runs the same compute on the same
    buffers: after a real pass of the same input, whose halo rows it finds in place, every value equals."""
    torch.manual_seed(0)
    model = build_model(name, 3, size, 10).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    plan = plan_split(trace_model(model, (3, size, size)), weights)

    def rank(comm):
        executor = SplitExecutor(plan, model, comm)
        local = _local_rows(x, plan, comm.Get_rank())
        real = {k: v.clone() for k, v in executor.forward_local(local).items() if isinstance(v, torch.Tensor)}
        free = executor.forward_local(local, exchange=False)
        return [k for k, v in real.items() if not torch.equal(v, free[k])], len(real)

    for differ, values in run_ranks(len(weights), rank, timeout_s=20.0):
        assert differ == [] and values > 5


def test_a_pass_without_messages_waits_for_no_peer():
    """Rank 0 alone runs it (its peer has left) through halo exchanges and a squeeze-excite's all-reduce."""
    torch.manual_seed(0)
    model = build_model("tv:mobilenet_v3_small", 3, 64, 10).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = plan_split(trace_model(model, (3, 64, 64)), [1.0, 1.0])
    assert any(isinstance(ins, AllReduce) for ins in lower_all(plan, model)[0].split)

    def rank(comm):
        executor = SplitExecutor(plan, model, comm)
        if comm.Get_rank() == 0:
            return executor.forward_local(_local_rows(x, plan, 0), exchange=False)
        return None

    env = run_ranks(2, rank, timeout_s=2.0)[0]
    assert all(torch.isfinite(v).all() for v in env.values() if isinstance(v, torch.Tensor))


def test_an_executor_whose_pass_failed_runs_no_further_pass():
    """Its peer left mid-pass: rank 0's pass ends in PeerTimeout with its receives posted, and the next pass
    (which would start the same requests, with the same tags, on the same buffers) is refused with the reason."""
    torch.manual_seed(0)
    model = build_model("edge1", 3, 32, 10).eval()
    x = torch.randn(1, 3, 32, 32)
    plan = plan_split(trace_model(model, (3, 32, 32)), [1.0, 1.0])

    def rank(comm):
        executor = SplitExecutor(plan, model, comm)
        if comm.Get_rank() != 0:
            return None
        with pytest.raises(PeerTimeout):
            executor.forward_local(_local_rows(x, plan, 0))
        with pytest.raises(RuntimeError, match=r"earlier pass failed \(PeerTimeout: .*build a new executor"):
            executor.forward_local(_local_rows(x, plan, 0))
        return "refused"

    assert run_ranks(2, rank, timeout_s=1.0)[0] == "refused"


def test_one_rank_reduces_nothing_and_equals_torch(monkeypatch):
    """On one rank (the benchmark's bound and unsplit reference run on COMM_SELF) a global pool's all-reduce and
    the head's reduce are the rank's own part: no MPI collective is started (each cost ~30 us, charged to the
    bound), and the output still equals plain torch."""
    from mpi4py import MPI

    import runtime.transport as transport

    torch.manual_seed(0)
    model = build_model("tv:mobilenet_v3_small", 3, 64, 10).eval()
    plan = plan_split(trace_model(model, (3, 64, 64)), [1.0])
    assert any(isinstance(ins, AllReduce) for ins in lower_all(plan, model)[0].split)
    executor = SplitExecutor(plan, model, MPI.COMM_SELF)

    started = transport._collective

    def collective(comm, request, what, *args, **kwargs):  # every collective of the transport waits here
        if what in ("an all-reduce", "a reduce"):
            raise AssertionError(f"{what} on one rank")
        return started(comm, request, what, *args, **kwargs)

    monkeypatch.setattr(transport, "_collective", collective)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(executor(x, batch=2), model(x), atol=1e-5, rtol=0)
