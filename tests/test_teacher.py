"""Teacher training on tiny synthetic data: augmentation, resume bit-for-bit, dataset subsets."""
import numpy as np
import pytest
import torch

from kd.datasets import ImageArrays, balanced_subset, load_dataset
from kd.teacher import TeacherConfig, augment, to_tensor, train_teacher
from runtime.errors import UsageError


def tiny(classes=3, n=48, channels=3, side=32, seed=0) -> ImageArrays:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = (rng.random((n, side, side, channels)) * 60 + y[:, None, None, None] * 60).astype(np.uint8)
    return ImageArrays("tiny", x, y.astype(np.int64), x[:12], y[:12].astype(np.int64), classes,
                       (0.5,) * channels, (0.25,) * channels)


def test_augment_keeps_shape_and_content_range():
    data = tiny()
    x = to_tensor(data.x_train, data)
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert not torch.equal(out, x)  # it did crop or flip something
    # a crop of a zero-padded image: every value is either from the image or padding zero
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_fashion_sized_images_are_padded_to_32():
    data = tiny(channels=1, side=28)
    assert to_tensor(data.x_train, data).shape == (48, 1, 32, 32)


def test_resume_continues_bit_for_bit(tmp_path):
    data = tiny()
    config = TeacherConfig(epochs=2, batch=16, max_lr=0.05)
    straight = train_teacher(data, str(tmp_path / "a.pt"), config, progress=False)
    cut = train_teacher(data, str(tmp_path / "b.pt"), config, progress=False, stop_after=1)
    assert cut["epochs"] == 1
    resumed = train_teacher(data, str(tmp_path / "b.pt"), config, progress=False)
    assert resumed["epochs"] == 2
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["test_acc"] for h in straight["history"]] == [h["test_acc"] for h in resumed["history"]]


def test_resume_with_other_options_is_refused(tmp_path):
    data = tiny()
    train_teacher(data, str(tmp_path / "a.pt"), TeacherConfig(epochs=2, batch=16), progress=False, stop_after=1)
    with pytest.raises(UsageError, match="resume with the same options"):
        train_teacher(data, str(tmp_path / "a.pt"), TeacherConfig(epochs=3, batch=16), progress=False)


def test_resume_on_another_dataset_is_refused(tmp_path):
    from dataclasses import replace

    data = tiny()
    train_teacher(data, str(tmp_path / "a.pt"), TeacherConfig(epochs=2, batch=16), progress=False, stop_after=1)
    with pytest.raises(UsageError, match="is a tiny run, not other"):
        train_teacher(replace(data, name="other"), str(tmp_path / "a.pt"), TeacherConfig(epochs=2, batch=16),
                      progress=False)


def test_cache_files_are_written_whole_and_leave_no_temp_files(tmp_path):
    from models.checkpoint import write_atomic

    target = tmp_path / "blob"
    write_atomic(target, lambda fh: fh.write(b"x" * 1000))
    write_atomic(target, lambda fh: fh.write(b"y" * 10))
    assert target.read_bytes() == b"y" * 10 and [p.name for p in tmp_path.iterdir()] == ["blob"]


class _FakeTorchvision:
    """A torchvision dataset class stand-in that fails the way the real one does."""

    def __init__(self, failure):
        self.failure = failure

    def __call__(self, root, train, download):
        raise self.failure


def test_torchvision_failures_become_none_or_one_line():
    from urllib.error import URLError

    from kd.datasets import _torchvision_splits

    # files absent (torchvision raises RuntimeError): fall through to the next source
    assert _torchvision_splits(_FakeTorchvision(RuntimeError("Dataset not found")), "/x", "cifar10", False) is None
    # a requested download that fails: one line naming the fix, not a URLError traceback
    with pytest.raises(UsageError, match="downloading cifar10 failed .*drop --download"):
        _torchvision_splits(_FakeTorchvision(URLError("no route")), "/x", "cifar10", True)
    # an OSError while reading local files is not a download failure: it propagates as is
    with pytest.raises(PermissionError):
        _torchvision_splits(_FakeTorchvision(PermissionError("denied")), "/x", "cifar10", False)


def test_balanced_subsets_are_nested_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    small, large = balanced_subset(labels, 50, 10), balanced_subset(labels, 200, 10)
    assert set(small) <= set(large)
    assert np.bincount(labels[large], minlength=10).tolist() == [20] * 10


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(UsageError, match="cifar10.npz.xz"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(UsageError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "cifar10.npz.xz").exists(), reason="no ../shared/data/cifar10.npz.xz")
def test_real_cifar10_layout():
    data = load_dataset("cifar10", SHARED)
    assert data.x_train.shape == (50000, 32, 32, 3) and data.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(data.y_train).tolist() == [5000] * 10
    idx = balanced_subset(data.y_train, 500, 10)
    assert np.bincount(data.y_train[idx]).tolist() == [50] * 10


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setenv("AFLKD_CACHE", str(tmp_path / "cache"))  # decompress into the test's folder
    data = load_dataset("fashion-mnist", tmp_path)  # nothing under tmp_path: falls back to Debian's files
    assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
    assert abs(data.x_train.mean() / 255 - data.mean[0]) < 1e-3


def test_init_starts_from_saved_weights(tmp_path):
    data = tiny()
    train_teacher(data, str(tmp_path / "a.pt"), TeacherConfig(epochs=1, batch=16), progress=False)
    # max_lr 0: SGD cannot move the weights, so they must still be the ones loaded
    train_teacher(data, str(tmp_path / "b.pt"), TeacherConfig(epochs=1, batch=16, max_lr=0.0, init=str(tmp_path / "a.pt")),
                  progress=False)
    fresh = train_teacher(data, str(tmp_path / "c.pt"), TeacherConfig(epochs=1, batch=16, max_lr=0.0), progress=False)
    a, b, c = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abc")
    assert fresh["epochs"] == 1
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))
    assert not torch.equal(a["conv1_1.weight"], c["conv1_1.weight"])


def test_init_that_does_not_exist_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        train_teacher(tiny(), str(tmp_path / "a.pt"), TeacherConfig(epochs=1, batch=16, init=str(tmp_path / "nope.pt")),
                      progress=False)


def test_state_saved_before_init_existed_still_resumes(tmp_path):
    data = tiny()
    config = TeacherConfig(epochs=2, batch=16)
    train_teacher(data, str(tmp_path / "a.pt"), config, progress=False, stop_after=1)
    state = torch.load(tmp_path / "a.pt.state", weights_only=False)
    del state["config"]["init"]
    torch.save(state, tmp_path / "a.pt.state")
    assert train_teacher(data, str(tmp_path / "a.pt"), config, progress=False)["epochs"] == 2


def _state(path):
    return torch.load(str(path) + ".state", weights_only=False)


def test_swa_output_is_the_mean_of_the_averaged_epochs_iterates(tmp_path):
    data = tiny()
    config = TeacherConfig(epochs=4, batch=16, max_lr=0.05, swa_epochs=3, swa_lr=0.02)
    out = tmp_path / "a.pt"
    iterates = []
    for stop in range(1, 5):  # cut after every epoch to read that epoch's SGD weights from the state
        summary = train_teacher(data, str(out), config, progress=False, stop_after=stop)
        state = _state(out)
        iterates.append(state["model"])
        if stop > 1:  # the averaging epochs run at the constant rate, not the one-cycle's
            assert all(g["lr"] == 0.02 for g in state["optimizer"]["param_groups"])
    final = torch.load(out, weights_only=True)
    averaged = iterates[1:]  # epoch 1 is the one-cycle; epochs 2-4 are averaged
    for key, value in final.items():
        if value.is_floating_point():  # weights and BatchNorm running statistics alike
            mean = sum(it[key] for it in averaged) / len(averaged)
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6)
    assert not torch.equal(final["bn1_1.running_mean"], iterates[-1]["bn1_1.running_mean"])
    assert summary["history"][-1]["averaged"] == 3
    assert summary["test_acc"] == summary["history"][-1]["test_acc"]


def test_swa_resume_continues_bit_for_bit(tmp_path):
    data = tiny()
    config = TeacherConfig(epochs=3, batch=16, max_lr=0.05, swa_epochs=2)
    straight = train_teacher(data, str(tmp_path / "a.pt"), config, progress=False)
    train_teacher(data, str(tmp_path / "b.pt"), config, progress=False, stop_after=2)
    resumed = train_teacher(data, str(tmp_path / "b.pt"), config, progress=False)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["history"] == [{**h, "seconds": s["seconds"], "images_per_s": s["images_per_s"]}
                                   for h, s in zip(resumed["history"], straight["history"])]


def test_swa_from_init_alone_has_no_one_cycle(tmp_path):
    data = tiny()
    train_teacher(data, str(tmp_path / "a.pt"), TeacherConfig(epochs=1, batch=16), progress=False)
    summary = train_teacher(data, str(tmp_path / "b.pt"),
                            TeacherConfig(epochs=2, batch=16, swa_epochs=2, init=str(tmp_path / "a.pt")),
                            progress=False)
    assert [h["averaged"] for h in summary["history"]] == [1, 2]


@pytest.mark.parametrize("swa_epochs, swa_lr, message", [(3, 0.01, "--swa-epochs must be between 0 and"),
                                                        (-1, 0.01, "--swa-epochs must be between 0 and"),
                                                        (1, 0.0, "--swa-lr must be > 0")])
def test_bad_swa_options_are_one_clear_error(tmp_path, swa_epochs, swa_lr, message):
    with pytest.raises(UsageError, match=message):
        train_teacher(tiny(), str(tmp_path / "a.pt"),
                      TeacherConfig(epochs=2, batch=16, swa_epochs=swa_epochs, swa_lr=swa_lr), progress=False)


def test_average_of_saved_nets_is_their_mean_and_is_evaluated(tmp_path):
    from kd.teacher import average_teachers

    data = tiny()
    paths = []
    for seed in range(3):  # three different nets; the mean of anything is still a mean
        train_teacher(data, str(tmp_path / f"n{seed}.pt"), TeacherConfig(epochs=1, batch=16, seed=seed), progress=False)
        paths.append(str(tmp_path / f"n{seed}.pt"))
    accuracy = average_teachers(data, paths, str(tmp_path / "avg.pt"))
    nets = [torch.load(p, weights_only=True) for p in paths]
    avg = torch.load(tmp_path / "avg.pt", weights_only=True)
    for key, value in avg.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(n[key] for n in nets) / 3, rtol=1e-5, atol=1e-6)
    assert 0.0 <= accuracy <= 1.0
    with pytest.raises(UsageError, match="at least two weights files"):
        average_teachers(data, paths[:1], str(tmp_path / "one.pt"))
