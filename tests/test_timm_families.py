"""timm's CNNs split exactly as timm builds them (the ``zoo`` extra; skipped without timm).

Three small families of the table in docs/timm.md (made by tests/timm_families.py): ECA-ResNet (its
gate is broadcast by ``y.expand_as(x)``), MobileNetV3 (squeeze-excitation, hard-swish) and ResNeSt
(split attention), at every MPI size of the suite, batch 1 even and batch 2 uneven.
"""
import pytest

TIMM_NETS = ("ecaresnet26t", "mobilenetv3_small_050", "resnest14d")


@pytest.mark.mpi(min_size=2)
def test_timm_families_match_unsplit(world, split_check, agree):
    pytest.importorskip("timm")
    from tests.timm_families import build

    problems = []
    for name in TIMM_NETS:
        model = build(name)  # seeded random weights, randomised BatchNorm statistics, eval mode
        for weights, batch in (([1.0] * world.size, 1), ([1.0 + r for r in range(world.size)], 2)):
            problems += split_check(world, model, (3, 64, 64), batch, weights, 5, f"{name} w={weights}",
                                    tol=1e-4, relative=True)
    agree(world, problems)

