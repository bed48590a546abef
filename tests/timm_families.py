"""Which of timm's CNN families split by height exactly, and which the runtime refuses (and why).

Run from the checkout, under MPI at 2 ranks (timm is the ``zoo`` extra, never a runtime dependency)::

    .venv/bin/pip install -e '.[zoo]'        # or: .venv/bin/pip install timm
    .venv/bin/mpiexec -n 2 .venv/bin/python tests/timm_families.py

For one representative model per family: build it with random weights
(``timm.create_model(name, pretrained=False, num_classes=10).eval()``), randomise
its BatchNorm statistics, trace and plan it (``trace_model`` + ``plan_split``; a
``UsageError`` is a refusal and its line is recorded), and if it plans, run it
split over the ranks and compare with the unsplit model on rank 0 (output within
1e-4 of max |output|, and every node's bytes equal to the brute-force minimum:
``tests/conftest.py run_and_check``), with even weights at batch 1 and uneven
weights (1, 2, ...) at batch 2.  Writes ``docs/timm.md`` (the table) and
``docs/timm.json`` (the same rows) on rank 0.  Not collected by pytest (no
``test_`` prefix); ``tests/test_timm_families.py`` checks a few of the exact ones.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)

#: (family, model, input size): one small model per family; 64x64 unless the model needs more
#: (Inception's reductions) or is built for one size only (transformers: their native size).
FAMILIES: tuple[tuple[str, str, int], ...] = (
    ("ResNet", "resnet18", 64),
    ("ResNet-D", "resnet26d", 64),
    ("ResNeXt (ByobNet)", "resnext26ts", 64),
    ("SE-ResNet", "seresnet18", 64),
    ("SE-ResNet (legacy SENet)", "legacy_seresnet18", 64),
    ("SE-ResNeXt (ByobNet)", "seresnext26ts", 64),
    ("ECA-ResNet", "ecaresnet26t", 64),
    ("GC-ResNet (global context)", "gcresnet33ts", 64),
    ("SK-ResNet (selective kernel)", "skresnet18", 64),
    ("ResNet-AA (anti-aliased)", "resnetaa34d", 64),
    ("ResNet-Blur (BlurPool)", "resnetblur18", 64),
    ("Res2Net", "res2net50_14w_8s", 64),
    ("ResNeSt (split attention)", "resnest14d", 64),
    ("TResNet", "tresnet_m", 64),
    ("ResNetV2 / BiT", "resnetv2_50x1_bit", 64),
    ("NF-ResNet (normaliser-free)", "nf_resnet26", 64),
    ("RegNetX", "regnetx_002", 64),
    ("RegNetY", "regnety_002", 64),
    ("RegNetZ", "regnetz_005", 64),
    ("EfficientNet", "efficientnet_b0", 64),
    ("EfficientNet (TF 'same' padding)", "tf_efficientnet_b0", 64),
    ("EfficientNetV2", "efficientnetv2_rw_t", 64),
    ("TinyNet", "tinynet_e", 64),
    ("MobileNetV2", "mobilenetv2_050", 64),
    ("MobileNetV3", "mobilenetv3_small_050", 64),
    ("MobileNetV4 (conv)", "mobilenetv4_conv_small_050", 64),
    ("MobileNetV4 (hybrid)", "mobilenetv4_hybrid_medium_075", 64),
    ("MNASNet", "mnasnet_050", 64),
    ("MixNet", "mixnet_s", 64),
    ("FBNet", "fbnetc_100", 64),
    ("FBNetV3", "fbnetv3_b", 64),
    ("HardCoReNAS", "hardcorenas_a", 64),
    ("LCNet", "lcnet_050", 64),
    ("GhostNet", "ghostnet_050", 64),
    ("GhostNetV2", "ghostnetv2_100", 64),
    ("RepGhostNet", "repghostnet_050", 64),
    ("ReXNet", "rexnet_100", 64),
    ("DenseNet", "densenet121", 64),
    ("DLA", "dla34", 64),
    ("DPN", "dpn48b", 64),
    ("HRNet", "hrnet_w18_small", 64),
    ("CSPResNet", "cspresnet50", 64),
    ("CSPDarkNet", "cspdarknet53", 64),
    ("CS3DarkNet", "cs3darknet_s", 64),
    ("VoVNet (eSE)", "ese_vovnet19b_slim", 64),
    ("VoVNet (ECA)", "eca_vovnet39b", 64),
    ("SelecSLS", "selecsls42b", 64),
    ("RepVGG", "repvgg_a0", 64),
    ("MobileOne", "mobileone_s0", 64),
    ("GENet", "gernet_s", 64),
    ("Xception", "xception41", 64),
    ("Inception-v3", "inception_v3", 96),
    ("Inception-v4", "inception_v4", 96),
    ("VGG", "vgg11", 64),
    ("HGNetV2", "hgnetv2_b0", 64),
    ("ConvNeXt", "convnext_atto", 64),
    ("InceptionNeXt", "inception_next_atto", 64),
    ("FastViT", "fastvit_t8", 64),
    ("StarNet", "starnet_s050", 64),
    ("PoolFormer", "poolformer_s12", 64),
    ("EdgeNeXt", "edgenext_xx_small", 64),
    ("MambaOut", "mambaout_femto", 64),
    ("EfficientFormer", "efficientformer_l1", 224),
    ("LeViT", "levit_128s", 224),
    ("ViT", "vit_tiny_patch16_224", 224),
    ("MobileViT", "mobilevit_xxs", 64),
    ("EfficientViT (MIT)", "efficientvit_b0", 64),
    ("BoTNet", "botnet26t_256", 256),
    ("HaloNet", "halonet26t", 256),
    ("LambdaNet", "lambda_resnet26t", 64),
    ("CoAtNet", "coatnet_0_224", 224),
)

BUILD_LIMIT_S = 60.0  # a model slower than this to build is skipped
TOL = 1e-4
SEED = 5  # the image run_and_check splits
RETRY_SIZE = 224  # where random nets blow up at 64x64 (2x2 last maps), retried here
DOC = os.path.join(ROOT, "docs", "timm.md")
JSON = os.path.join(ROOT, "docs", "timm.json")
COMMAND = ".venv/bin/mpiexec -n 2 .venv/bin/python tests/timm_families.py"


def build(name: str) -> torch.nn.Module:
    """The timm model with seeded random weights (the same on every rank) and randomised BatchNorm."""
    import timm

    from models import randomize_batchnorm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        return randomize_batchnorm(model, torch.Generator().manual_seed(1))


def calibrate_batchnorm(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of its own input on the compared images.

    With random weights and random statistics some deep nets blow up (efficientnetv2_rw_t's logits
    reach 1e5): the unsplit float32 output then differs from float64 by more than the tolerance and no
    comparison means anything. One eval-mode pass sets each BatchNorm, just before it runs, to the mean
    and (biased) variance of what it receives, so every layer's output stays near unit scale on these
    images (a train-mode pass does not: on 2x2 maps the eval-mode inputs drift from the train-mode ones
    and low-variance channels amplify the drift). The statistics are still not 0 and 1 and the affine
    terms stay random, so a wrong split of BatchNorm still shows.
    """
    done: set[int] = set()

    def set_stats(module, args):
        if id(module) not in done:
            done.add(id(module))
            x = args[0]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.running_mean is not None]
    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED))  # the images compared
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        for h in hooks:
            h.remove()
    return model


def float32_noise(model: torch.nn.Module, size: int, batch: int, seed: int) -> float:
    """Max |float32 - float64| of the unsplit model's output, relative to max |output| (run_and_check's image)."""
    import copy

    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        single = model(image).double()
        double = copy.deepcopy(model).double()(image.double())
    return float((single - double).abs().max() / double.abs().max().clamp_min(1e-30))


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".strip()


def check(comm, family: str, name: str, size: int, available: set[str]) -> dict:
    """One row: result ``exact``, ``mismatch``, ``refused``, ``skipped``, ``missing`` or ``error``."""
    from runtime.errors import UsageError
    from runtime.graph import trace_model
    from runtime.plan import plan_split

    row = dict(family=family, model=name, size=size, result="", reason="", seconds=0.0)
    if name not in available:
        return dict(row, result="missing", reason=f"no model '{name}' in this timm version")
    start = time.perf_counter()
    model, why = None, ""
    try:
        model = build(name)
    except Exception as err:  # noqa: BLE001 - any construction failure is recorded
        why = f"construction failed: {one_line(err)}"
    built_s = comm.allreduce(time.perf_counter() - start, op=_max())
    why = next((w for w in comm.allgather(why) if w), "")
    if why:
        return dict(row, result="skipped", reason=why, seconds=round(built_s, 1))
    if built_s > BUILD_LIMIT_S:
        return dict(row, result="skipped", reason=f"construction took {built_s:.0f} s > {BUILD_LIMIT_S:.0f} s",
                    seconds=round(built_s, 1))
    # Trace and plan in this process alone (every rank does the same, deterministically).
    refusal = ""
    try:
        plan_split(trace_model(model, (3, size, size)), [1.0] * comm.size)
    except UsageError as err:
        refusal = str(err).strip().splitlines()[0]
    except Exception as err:  # noqa: BLE001
        refusal = f"(not a UsageError) {one_line(err)}"
    refusals = comm.allgather(refusal)
    if any(refusals):
        text = next(r for r in refusals if r)
        result = "error" if text.startswith("(not a UsageError)") else "refused"
        return dict(row, result=result, reason=text, seconds=round(time.perf_counter() - start, 1))
    everyone = split_problems(comm, model, size)
    note = ""
    if everyone and all("max error" in p for p in everyone):  # outputs differ, bytes right: float32 noise?
        noise = comm.bcast(float32_noise(model, size, 2, SEED) if comm.rank == 0 else None)
        if noise > TOL / 10:  # the unsplit model alone cannot be compared at this tolerance: retry
            error, first = everyone[0].split("max error ")[1].split(" ")[0], size
            model, size = calibrate_batchnorm(model, RETRY_SIZE), RETRY_SIZE
            row["size"] = size
            retry_noise = comm.bcast(float32_noise(model, size, 2, SEED) if comm.rank == 0 else None)
            note = (f" (at {RETRY_SIZE}x{RETRY_SIZE} with BatchNorm statistics of the compared images: with "
                    f"randomised statistics at {first}x{first} the unsplit output is ill-conditioned, float32 "
                    f"differs from float64 by {noise:.2g} of max |output| and the split by {error}; here "
                    f"float32 noise is {retry_noise:.2g})")
            everyone = split_problems(comm, model, size)
    seconds = round(comm.allreduce(time.perf_counter() - start, op=_max()), 1)
    if everyone:
        return dict(row, result="mismatch" if "max error" in everyone[0] or "bytes" in everyone[0] else "error",
                    reason=("; ".join(dict.fromkeys(everyone)) + note)[:600], seconds=seconds)
    return dict(row, result="exact", reason=f"equal within {TOL:g} of max |output|, minimum bytes{note}",
                seconds=seconds)


def split_problems(comm, model: torch.nn.Module, size: int) -> list[str]:
    """Every rank's problems splitting ``model``: even weights at batch 1, uneven weights at batch 2."""
    from tests.conftest import run_and_check

    problems: list[str] = []
    try:
        for weights, batch in (([1.0] * comm.size, 1), ([1.0 + r for r in range(comm.size)], 2)):
            problems += run_and_check(comm, model, (3, size, size), batch, weights, SEED,
                                      f"w={weights} batch {batch}", tol=TOL, relative=True)
    except Exception as err:  # noqa: BLE001 - e.g. a UsageError only the executor raises
        problems.append(f"split run failed: {one_line(err)}")
    return [p for rank_problems in comm.allgather(problems) for p in rank_problems]


def _max():
    from mpi4py import MPI

    return MPI.MAX


def markdown(rows: list[dict], versions: dict, ranks: int) -> str:
    counts = {k: sum(r["result"] == k for r in rows) for k in ("exact", "refused", "mismatch", "error", "skipped",
                                                                  "missing")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    lines = [
        "# timm's CNN families under the height split",
        "",
        "Which families of [timm](https://github.com/huggingface/pytorch-image-models) split by feature-map",
        "height exactly, as timm builds them (no rewriting), and which the runtime refuses, with the one line",
        "it prints. Generated by `tests/timm_families.py` (do not edit by hand; rerun it):",
        "",
        "```bash",
        ".venv/bin/pip install -e '.[zoo]'   # timm: the zoo extra, never a runtime dependency",
        COMMAND,
        "```",
        "",
        f"Versions: timm {versions['timm']}, torch {versions['torch']}, Python {versions['python']}; "
        f"{ranks} MPI ranks.",
        "",
        "Per model: `timm.create_model(name, pretrained=False, num_classes=10).eval()` with seeded random",
        "weights and randomised BatchNorm statistics (`models.randomize_batchnorm`); traced and planned in one",
        "process (`runtime.graph.trace_model`, `runtime.plan.plan_split`): a `UsageError` is a **refusal**, its",
        "message is the reason. A model that plans is run split over the ranks and compared with the unsplit",
        "model (`tests/conftest.py run_and_check`): even weights at batch 1, uneven weights 1:2 at batch 2;",
        f"**exact** = output within {TOL:g} of max |output| and every node's bytes equal to the brute-force",
        "minimum. Input is 64x64 unless the model needs more (Inception: 96) or is built for one size",
        "(transformers: their native size). Only the first refusal of a model is reported.",
        "",
        f"Result: {len(rows)} models, {summary}.",
        "",
        "| family | model | input | result | reason (the runtime's line for a refusal) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r["reason"].replace("|", "\\|")  # table cells
        lines.append(f"| {r['family']} | `{r['model']}` | {r['size']}x{r['size']} | {r['result']} | {reason} |")
    lines += ["", NOTES.strip(), ""]
    return "\n".join(lines)


NOTES = """
## Notes

* **ECA** (ECA-ResNet, ECA-VoVNet) gates with `x * y.expand_as(x)`: `expand_as` broadcasts the
  per-channel gate to the rank's own rows, element by element, and is in `ELEMENTWISE_METHODS`
  (`runtime/layers.py`) since this survey; before, both were refused at `expand_as`.
* **Ill-conditioned random nets.** With random weights and randomised BatchNorm statistics some deep
  nets blow up at 64x64 (2x2 last maps): the unsplit model's own float32 output then differs from
  float64 by more than the tolerance, and no split can be compared with it. Where a split's output
  differs (bytes right) and that float32 noise exceeds a tenth of the tolerance, the script retries at
  224x224 with each BatchNorm's statistics set to those of its input on the compared images (still not
  0 and 1; the affine terms stay random); the row says so, with both noise figures.

## What the refusals mean

* **Mixes rows, correctly refused**: `Upsample`/`interpolate` (HRNet's fusion, GhostNetV2's DFC
  attention), a `reshape`/`view`/`flatten` that merges the height into another dimension (self-attention
  over positions: BoTNet, HaloNet, LambdaNet, LeViT, MobileNetV4-hybrid; global-context pooling with a
  softmax over positions: GC-ResNet; TResNet's space-to-depth stem, which folds 4x4 pixel blocks into
  channels).
* **Not traceable by torch.fx** ("symbolically traced variables cannot be used as inputs to control
  flow"): the model branches on a tensor's size at run time (TF-style 'same' padding computed per input,
  VGG's pre-logits, MobileViT, EfficientViT).
* **Fixed-size models** (ViT, EfficientFormer, CoAtNet, LeViT) take their native size. ViT's `forward`
  has an optional `attn_mask` argument, which fx turns into a second input and the runtime refuses
  first. CoAtNet's MBConv stages pass; its first refusal is the `LayerNorm` before its first attention
  block, which would be refused next.
* **Refused, but the runtime could learn them** (each needs a rule in `runtime/graph.py` or
  `runtime/layers.py`, not a new element-wise name):
  * `F.layer_norm` over the channel dimension only (after a `permute(0, 2, 3, 1)`: ConvNeXt's,
    EdgeNeXt's and MambaOut's stems and blocks) acts on each pixel alone.
  * `F.conv2d` with a weight computed in the forward (weight standardisation: NF-ResNet, BiT) is a
    window like `nn.Conv2d`, but `window_of_function` knows only the functional pools.
  * `F.pad` before a window: HGNetV2's stem pads with zeros, which the planner could fold into the
    next window's geometry; ResNet-Blur's BlurPool pads by reflection, which would need the rows next
    to the image edge copied instead of zeros.
  * `torch.stack` along a new channel-group dimension (SK-ResNet's selective kernel) is row-local like
    a channel `cat`.
* **Refused by the runtime's rules**: `F.group_norm` with one group (PoolFormer) normalises over the
  height too (it would need statistics reduced over all ranks, like a global pool); an `AvgPool2d` with
  `count_include_pad=False` and height padding (Inception-v4, EfficientFormer's pooling mixer) has a
  divisor that depends on the image edge, as the runtime says.
"""


def main() -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    import timm

    available = set(timm.list_models())
    only = set(sys.argv[1:])  # optional model names: check just these, print, write no file
    rows = []
    for family, name, size in FAMILIES:
        if only and name not in only:
            continue
        row = check(comm, family, name, size, available)
        rows.append(row)
        if comm.rank == 0:
            print(f"{name:32s} {row['result']:8s} {row['seconds']:6.1f}s  {row['reason'][:150]}", flush=True)
    if comm.rank == 0 and not only:
        versions = dict(timm=timm.__version__, torch=torch.__version__, python=platform.python_version())
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(markdown(rows, versions, comm.size))
        with open(JSON, "w", encoding="utf-8") as f:
            json.dump(dict(command=COMMAND, ranks=comm.size, tol=TOL, versions=versions, rows=rows), f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.relpath(DOC, ROOT)} and {os.path.relpath(JSON, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
