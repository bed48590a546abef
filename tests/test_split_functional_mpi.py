"""Row-local patterns of model zoos split exactly: functional pools and BatchNorm, channel slices by
indexing, sums over a channel-group dimension (split attention), at every MPI size of the suite."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


class ZooPatterns(nn.Module):
    """What timm's and torchvision's CNNs write as functions rather than modules."""

    def __init__(self, radix: int = 2, channels: int = 8):
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.register_buffer("mean", torch.randn(channels))
        self.register_buffer("var", torch.rand(channels) + 0.5)
        self.gamma = nn.Parameter(torch.randn(channels))
        self.beta = nn.Parameter(torch.randn(channels))
        self.conv = nn.Conv2d(channels // 2, channels * radix, 3, padding=1)
        self.fc = nn.Linear(channels, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        a, b = x[:, : x.shape[1] // 2], x[..., 4:, :, :]  # channel slices by indexing
        y = self.conv(a + b[:, : a.shape[1]])
        n, c, h, w = y.shape
        y = y.view(n, self.radix, c // self.radix, h, w).sum(dim=1)  # split attention's sum over the radix
        y = F.avg_pool2d(y, 3, 1, 1)
        y = torch.sum(y, dim=1, keepdim=True) * 0.1 + y
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("size", [16, 37])
def test_zoo_patterns_match_unsplit(world, split_check, agree, size):
    torch.manual_seed(size)
    model = ZooPatterns().eval()
    problems = []
    for weights, batch in (([1.0] * world.size, 1), ([1.0 + r for r in range(world.size)], 2)):
        problems += split_check(world, model, (3, size, size), batch, weights, size, f"zoo@{size} w={weights}")
    agree(world, problems)


def test_the_patterns_trace_to_row_local_nodes():
    from runtime.graph import trace_model

    graph = trace_model(ZooPatterns().eval(), (3, 16, 16))
    roles = {n.name: n.role for n in graph.nodes}
    assert roles["max_pool2d"] == "window" and roles["avg_pool2d"] == "window"
    assert roles["batch_norm"] == "rowwise" and roles["getitem_1"] == "rowwise" and roles["getitem_2"] == "rowwise"
    assert roles["sum_1"] == "rowwise" and roles["sum_2"] == "rowwise"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name,size", [("inception_v3", 96), ("regnet_y_400mf", 64)])
def test_torchvision_nets_with_functional_pools_or_tensor_constructors_match_unsplit(world, split_check, agree,
                                                                                     name, size):
    """inception_v3 pools with F.max_pool2d/F.avg_pool2d; regnet computes its widths with tensors in its
    constructor (it cannot be built under torch.device('meta'))."""
    import torchvision

    from models import randomize_batchnorm

    torch.manual_seed(0)
    kwargs = dict(aux_logits=False, init_weights=True) if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    model = randomize_batchnorm(model, torch.Generator().manual_seed(1)).eval()
    problems = split_check(world, model, (3, size, size), 1, [1.0 + r for r in range(world.size)], 0,
                           f"{name}@{size}", tol=1e-4, relative=True)
    agree(world, problems)


def test_a_skeleton_holds_no_weights_and_has_the_real_shapes():
    import torchvision

    from runtime.skeleton import empty_weights, is_empty

    with empty_weights():
        skeleton = torchvision.models.regnet_y_400mf()  # its constructor computes with tensors
    real = torchvision.models.regnet_y_400mf()
    assert is_empty(skeleton) and not is_empty(real)
    assert [(k, v.shape) for k, v in skeleton.state_dict().items()] == [(k, v.shape) for k, v in real.state_dict().items()]
    with torch.device("meta"), pytest.raises(NotImplementedError):  # why: the plain meta device fails on it
        torchvision.models.regnet_y_400mf()
