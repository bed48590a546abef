"""The pieces of one training loop with any teacher source: device choice, wire formats, batches
rebuilt from (seed, step) alone, teacher sources, method classes."""
import math

import numpy as np
import pytest
import torch

import kd.device
from kd.batches import BatchStream, derived_seed
from kd.device import FALLBACK_NOTE, autocast, grad_scaler, pick_device
from kd.methods import METHOD_CLASSES, make_method
from kd.teacher import augment, to_tensor
from kd.teacher_source import LocalTeacher, PrecomputedLogits
from kd.trainer import METHODS, EdgeConfig, train_edge
from kd.wire import WireFormat, parse_wire
from models import cloud_net
from runtime.errors import UsageError
from tests.test_teacher import tiny


# -- device ---------------------------------------------------------------------------------------------

def test_auto_falls_back_to_the_cpu_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kd.device, "_noted", False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err.splitlines() == [FALLBACK_NOTE]


def test_cpu_is_taken_silently_and_cuda_is_refused_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kd.device, "_noted", False)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="--device cuda: no CUDA device visible to torch .*use --device cpu or auto"):
        pick_device("cuda")
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="--device must be one of auto, cpu, cuda, got 'gpu'"):
        pick_device("gpu")


def test_auto_and_cuda_take_a_visible_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda") == pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_cpu_runs_without_autocast_or_loss_scaling():
    cpu = torch.device("cpu")
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert not grad_scaler(cpu).is_enabled()


@pytest.mark.parametrize("command", [["train", "cloud"], ["train", "edge"], ["train", "average", "a.pt", "b.pt",
                                     "--save", "c.pt"], ["train", "distill"], ["experiment", "accuracy", "--out", "o"],
                                     ["experiment", "frozen-time"]])
def test_every_training_command_takes_device(command):
    from launch.cli import build_parser, main

    assert build_parser().parse_args(command + ["--dataset", "cifar10"]).device == "auto"
    assert build_parser().parse_args(command + ["--dataset", "cifar10", "--device", "cpu"]).device == "cpu"
    assert main(command + ["--dataset", "cifar10", "--device", "tpu"]) == 2


def test_cuda_without_a_gpu_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    import kd.datasets
    import kd.trainer
    from launch.cli import main
    from models import save_atomic

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: tiny(n=60))
    monkeypatch.setattr(kd.trainer, "train_edge", lambda *a, **k: pytest.fail("training started"))
    save_atomic(cloud_net(3, 32, 3).state_dict(), str(tmp_path / "t.pt"))
    assert main(["train", "edge", "--dataset", "cifar10", "--teacher", str(tmp_path / "t.pt"), "--size", "30",
                 "--device", "cuda"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("aflkd: error: --device cuda: no CUDA device visible to torch")


# -- wire formats --------------------------------------------------------------------------------------

def _softmax(x):
    return torch.softmax(x.double(), dim=1)


@pytest.mark.parametrize("seed", range(20))
def test_wire_formats_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    batch, classes = int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(2, 120, (1,), generator=g))
    logits = torch.randn(batch, classes, generator=g) * float(torch.rand(1, generator=g) * 15 + 0.1)
    exact = WireFormat("float32")
    buf = exact.encode(logits)
    assert buf.dtype == torch.uint8 and buf.numel() == exact.nbytes(batch, classes) == batch * classes * 4
    assert torch.equal(exact.decode(buf, batch, classes), logits)  # bit-exact
    half = WireFormat("float16")
    buf = half.encode(logits)
    assert buf.numel() == half.nbytes(batch, classes) == batch * classes * 2
    assert torch.allclose(half.decode(buf, batch, classes), logits, rtol=2 ** -10, atol=1e-4)
    k = int(torch.randint(1, classes, (1,), generator=g))
    top = WireFormat("topk", k)
    buf = top.encode(logits)
    assert buf.numel() == top.nbytes(batch, classes) == batch * (k + 1) * 4 + batch * k * 2
    rebuilt = top.decode(buf, batch, classes)
    p, q = _softmax(logits), _softmax(rebuilt)
    # independent of the encoder: the K largest probabilities by sorting, the rest's mass by subtraction
    order = torch.argsort(logits, dim=1, descending=True)[:, :k]
    assert torch.allclose(q.gather(1, order), p.gather(1, order), atol=1e-5)
    rest = 1 - p.gather(1, order).sum(1)
    mask = torch.ones_like(p, dtype=torch.bool).scatter_(1, order, False)
    q_rest = q.masked_fill(~mask, 0)
    assert torch.allclose(q_rest.sum(1), rest, atol=1e-5)
    assert torch.allclose(q_rest.max(1).values, rest / (classes - k), atol=1e-5)  # flat tail


def test_wire_names_and_refusals():
    assert str(parse_wire("float32")) == "float32" and str(parse_wire(" TOPK:5 ")) == "topk:5"
    for bad in ("float64", "topk:0", "topk:x", "topk"):
        with pytest.raises(UsageError, match="wire format must be float32, float16 or topk:K"):
            parse_wire(bad)
    with pytest.raises(UsageError, match="topk:10 must keep between 1 and 9 of the 10 classes"):
        parse_wire("topk:10").check(10)


# -- batches from (seed, step) -------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch", [(48, 8), (50, 16), (5, 8), (64, 64)])
def test_any_batch_is_rebuilt_without_replaying_the_stream(n, batch):
    data = tiny(n=n)
    x = to_tensor(data.x_train, data)
    walked = BatchStream(x, batch, seed=3)
    steps = 3 * walked.steps_per_epoch + 1
    seen = [(walked.rows(s), walked.images(s, walked.rows(s))) for s in range(steps)]
    for s in reversed(range(steps)):  # a fresh stream jumping straight to step s: the same batch
        fresh = BatchStream(x, batch, seed=3)
        rows = fresh.rows(s)
        assert torch.equal(rows, seen[s][0]) and torch.equal(fresh.images(s, rows), seen[s][1])
    per_epoch = walked.steps_per_epoch
    for e in range(3):  # an epoch's batches are distinct images, each batch full
        rows = torch.cat([seen[s][0] for s in range(e * per_epoch, (e + 1) * per_epoch)])
        assert len(rows) == per_epoch * min(batch, n) and len(set(rows.tolist())) == len(rows)
    # the augmentation is the documented one, with its generator seeded by (seed, step) alone
    g = torch.Generator().manual_seed(derived_seed(3, "augment", 1))
    assert torch.equal(seen[1][1], augment(x[seen[1][0]], g))
    assert not torch.equal(BatchStream(x, batch, seed=4).rows(0), seen[0][0]) or n <= 5


# -- teacher sources and methods --------------------------------------------------------------------------

def test_precomputed_logits_are_rows_of_the_table():
    table = torch.randn(20, 4)
    source = PrecomputedLogits(table)
    idx = torch.tensor([3, 0, 19, 3])
    source.start(7, idx, torch.empty(0))
    assert torch.equal(source.logits(7), table[idx]) and source.classes == 4


def test_local_teacher_logits_are_the_teachers_in_eval_mode():
    torch.manual_seed(0)
    teacher = cloud_net(3, 32, 3)
    source = LocalTeacher(teacher)
    x = torch.randn(4, 3, 32, 32)
    source.start(0, torch.arange(4), x)
    got = source.logits(0)
    teacher.eval()
    with torch.no_grad():
        want = teacher(x)
    assert got.dtype == torch.float32 and torch.equal(got, want) and source.classes == 3


def test_a_teacher_and_its_local_source_train_the_same_student():
    data = tiny(n=48)
    torch.manual_seed(2)
    teacher = cloud_net(3, 32, 3).eval()
    config = EdgeConfig("aflkd", 2, steps=5, batch=8)
    a = train_edge(config, data, np.arange(40), teacher).model.state_dict()
    b = train_edge(config, data, np.arange(40), source=LocalTeacher(teacher)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_logits_train_kd_and_a_wrong_class_count_is_refused():
    data = tiny(n=48)
    idx = np.arange(40)
    table = torch.randn(40, 3)
    config = EdgeConfig("kd", 1, steps=4, batch=8)
    result = train_edge(config, data, idx, source=PrecomputedLogits(table))
    assert len(result.history) and result.history[-1]["step"] == 4
    with pytest.raises(UsageError, match="the teacher has 5 classes but tiny has 3"):
        train_edge(config, data, idx, source=PrecomputedLogits(torch.randn(40, 5)))


def test_a_given_student_continues_training():
    from models import edge_net

    data = tiny(n=48)
    torch.manual_seed(5)
    student = edge_net(1, 3, 32, 3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = train_edge(EdgeConfig("baseline", 1, steps=3, batch=8), data, np.arange(40), student=student)
    assert result.model is student and not torch.equal(before["conv1_1.weight"], student.conv1_1.weight)


def test_every_method_has_a_class_and_the_loop_asks_it():
    assert set(METHOD_CLASSES) == set(METHODS)
    expect = {"baseline": (False, False), "sslf": (False, True), "aflkd": (True, True), "kd": (True, False),
              "ctkd": (True, False)}
    for name, (distils, copies) in expect.items():
        method = make_method(EdgeConfig(name, 2))
        assert (method.distils, method.copies_shared_blocks) == (distils, copies), name
        assert bool(method.param_groups()) == (name in ("aflkd", "ctkd")), name
    sslf = make_method(EdgeConfig("sslf", 2, unit="block"))
    sslf.units = 5
    assert sslf.unit_kind() == "conv" and sslf.frozen_units() == 3
    aflkd = make_method(EdgeConfig("aflkd", 2, temperature=10.0))
    aflkd.units = 5
    assert aflkd.frozen_units() == 1  # Eq. 17 at T = Tmax, clamped to 1
    kd_method = make_method(EdgeConfig("kd", 1, temperature=3.0))
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    losses = kd_method.losses(s, t, y, 0)
    ps, pt = torch.log_softmax(s / 3, 1), torch.log_softmax(t / 3, 1)
    assert math.isclose(losses["kd"].item(), 9 * (pt.exp() * (pt - ps)).sum(1).mean().item(), rel_tol=1e-6)


@pytest.mark.parametrize("method", ["baseline", "kd"])
def test_the_loop_equals_a_plain_torch_loop(method):
    """The trainer against a hand-written loop of the same recipe (seeded student, nesterov SGD, one-cycle,
    batches of kd.batches, CE + T^2 KL written out): the same weights, bit for bit."""
    import torch.nn.functional as F

    from kd.schedule import one_cycle
    from models import edge_net

    data, idx = tiny(n=48), np.arange(5, 45)
    torch.manual_seed(9)
    teacher = cloud_net(3, 32, 3).eval().to(memory_format=torch.channels_last)
    config = EdgeConfig(method, 1, steps=9, batch=16, seed=4, temperature=3.0, kd_weight=0.7)
    got = train_edge(config, data, idx, teacher).model.state_dict()

    torch.manual_seed(4)
    student = edge_net(1, 3, 32, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay)
    schedule = one_cycle(optimizer, [config.lr], config.steps, pct_start=0.2)
    x, y = to_tensor(data.x_train[idx], data), torch.from_numpy(data.y_train[idx])
    batches = BatchStream(x, config.batch, config.seed)
    for step in range(config.steps):
        student.train()
        rows = batches.rows(step)
        xb = batches.images(step, rows)
        out = student(xb)
        loss = F.cross_entropy(out, y[rows])
        if method == "kd":
            with torch.no_grad():
                soft = F.log_softmax(teacher(xb) / 3.0, dim=1)
            log_q = F.log_softmax(out / 3.0, dim=1)
            loss = loss + 0.7 * (9.0 * (soft.exp() * (soft - log_q)).sum(1).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    want = student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_trainer_asks_for_batch_s_plus_1_before_batch_s_backward():
    """The round model's Comm chain: batch s+1's communication may run during Backward_s, so the trainer
    must hand it over before that backward pass (seen from a hook on the student's gradients)."""
    import numpy as np

    from kd.teacher_source import PrecomputedLogits
    from kd.trainer import EdgeConfig, train_edge
    from models import edge_net
    from tests.test_teacher import tiny

    events = []

    class Order(PrecomputedLogits):
        def start(self, step, rows, images):
            events.append(("start", step))
            super().start(step, rows, images)

        def forward(self, step):
            events.append(("forward", step))

        def logits(self, step):
            events.append(("logits", step))
            return super().logits(step)

    data, steps = tiny(n=48), 5
    torch.manual_seed(0)
    student = edge_net(1, 3, 32, 3)
    step_of = iter(range(steps))
    student[0].weight.register_hook(lambda g: events.append(("backward", next(step_of))))
    config = EdgeConfig("kd", 1, steps=steps, batch=8, seed=1)
    train_edge(config, data, np.arange(40), source=Order(torch.randn(40, 3)), student=student)
    for s in range(steps):
        at = {e: events.index((e, s)) for e in ("start", "forward", "logits", "backward")}
        assert at["start"] < at["forward"] < at["logits"] < at["backward"], (s, events)
        if s + 1 < steps:
            assert at["logits"] < events.index(("start", s + 1)) < at["backward"], (s, events)
    assert [e for e in events if e[0] == "start"] == [("start", s) for s in range(steps)]
