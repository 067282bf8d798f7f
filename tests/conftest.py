import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter; it reads this at kernel decoration,
# so it must be set before hykernels.backends.triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hykernels import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every backend usable here; the correctness suite runs each against the oracle.
BACKENDS = [b for b in ("reference", "torch_chunked", "triton", "cuda") if backends.availability(b, DEVICE) is None]
if DEVICE.type == "cpu":  # the cuda backend's Python side, its kernels emulated (tests/cuda_emulator.py)
    import cuda_emulator  # noqa: E402

    cuda_emulator.load()
    BACKENDS.append(cuda_emulator.NAME)
# Shapes on which the cuda backends get a workspace smaller than a row's vocabulary, forcing
# several vocabulary slices per chunk, and the triton backend one smaller than a chunk of fp32
# logits, forcing fused_loss's recompute path (the other shapes take the 6·N·D·V path).
SLICED_SHAPES = ("ragged", "realistic_vocab")


@pytest.fixture
def rng():
    """A fresh generator per test with a random seed, printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Triton tests use small tiles and several vocabulary splits, so ragged shapes span many
    partial tiles and the online-softmax rebasing and split merge are exercised; on SLICED_SHAPES
    the cuda backends get a workspace that holds a third of a row, and triton's fused_loss takes
    its recompute path."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") == "triton":
        from triton_tiles import SMALL, WIDE

        from hykernels.backends import triton as tb

        wide = params.get("shape") == "realistic_vocab"  # 32k vocabulary: wider tiles keep it fast
        monkeypatch.setattr(tb._configs, "OVERRIDE", WIDE if wide else SMALL)
        if params.get("shape") in SLICED_SHAPES:  # a chunk of fp32 logits does not fit: the recompute path
            from cases import SHAPES

            _, _, vocab, *_, chunk = SHAPES[params["shape"]]
            monkeypatch.setattr(tb, "WORKSPACE_BYTES", chunk * tb._padded(vocab) * 4 - 1)
    if params.get("backend") in ("cuda", "cuda_emulated") and params.get("shape") in SLICED_SHAPES:
        from cases import SHAPES
        from cuda_emulator import sliced_workspace

        _, _, vocab, *_, chunk = SHAPES[params["shape"]]
        module = backends._load(params["backend"])
        monkeypatch.setattr(module, "WORKSPACE_BYTES", sliced_workspace(chunk, vocab, slices=3))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
