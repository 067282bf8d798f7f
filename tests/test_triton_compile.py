"""What tests/compile_triton.py relies on, checked without compiling (the compile itself is
test_triton.py::test_triton_kernels_compile_for_sm80_and_sm90):

- every Blocks a test sets as _configs.OVERRIDE is one of tests/triton_tiles.py's (the list the
  compile builds in every kernel's role), found by reading the test sources;
- the main-loop check (tests/kernel_asm.py) accepts a wgmma loop fed by TMA and rejects an
  mma.sync kernel, a loop fed by pointer loads and an MMA outside any loop, on short listings in
  the form nvdisasm and triton's PTX have.
"""
import ast
import dataclasses
from pathlib import Path

import pytest

import kernel_asm
from triton_tiles import OVERRIDES, tile

from hykernels.backends.triton import _configs
from hykernels.backends.triton._configs import Blocks

TESTS = Path(__file__).resolve().parent
NAMED = {name: b for name, b in vars(__import__("triton_tiles")).items() if isinstance(b, Blocks)}
COMPILED = {tile(b) for b in (*OVERRIDES, _configs.INTERPRETER)}


def _tiles(node: ast.AST, where: str) -> list:
    """The tiles an OVERRIDE value can take: None, a triton_tiles name, dataclasses.replace of
    one changing only ``splits``, a literal Blocks(...), or a conditional of those."""
    if isinstance(node, ast.Constant) and node.value is None:
        return []
    if isinstance(node, ast.IfExp):
        return _tiles(node.body, where) + _tiles(node.orelse, where)
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    if name in NAMED:
        return [tile(NAMED[name])]
    if isinstance(node, ast.Call):
        fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if fn == "replace" and node.args and all(k.arg == "splits" for k in node.keywords):
            return _tiles(node.args[0], where)
        if fn == "Blocks":
            try:
                args = [ast.literal_eval(a) for a in node.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg != "splits"}
            except ValueError:
                pass
            else:
                return [tile(Blocks(*args, **kwargs))]
    raise AssertionError(f"{where}: cannot tell which tile this OVERRIDE is ({ast.unparse(node)}); "
                         f"take it from tests/triton_tiles.py")


def overrides(source: str, name: str) -> list:
    """(where, tile) of every value assigned to an OVERRIDE in ``source``: ``x.OVERRIDE = v``
    and ``monkeypatch.setattr(x, "OVERRIDE", v)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        value = None
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "OVERRIDE"
                                                for t in node.targets):
            value = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
              and len(node.args) == 3 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "OVERRIDE"):
            value = node.args[2]
        if value is not None:
            where = f"{name}:{node.lineno}"
            found += [(where, t) for t in _tiles(value, where)]
    return found


def test_every_override_the_tests_set_is_compiled():
    found = [o for path in sorted(TESTS.glob("*.py")) for o in overrides(path.read_text(), path.name)]
    assert len(found) >= 5  # conftest (two), test_triton_design, test_triton, dist_worker
    missing = [(where, t) for where, t in found if t not in COMPILED]
    assert not missing, f"OVERRIDE tiles that tests/compile_triton.py does not build: {missing}"
    # The tiles tests/compile_triton.py builds are the ones the tests use (and INTERPRETER).
    assert {t for _, t in found} | {tile(_configs.INTERPRETER)} == COMPILED


@pytest.mark.parametrize("code,ok", [
    ('monkeypatch.setattr(tb._configs, "OVERRIDE", tb.Blocks(m=16, n=128, k=16, splits=3))', False),
    ('tb._configs.OVERRIDE = Blocks(16, 32, 16, splits=5)', True),  # NARROW's tile
    ('monkeypatch.setattr(c, "OVERRIDE", dataclasses.replace(WIDE, splits=9))', True),
    ('monkeypatch.setattr(c, "OVERRIDE", dataclasses.replace(WIDE, n=512))', None),
    ('c.OVERRIDE = SMALL if wide else make_blocks()', None),
])
def test_the_override_scan_flags_an_uncompiled_tile(code, ok):
    """The scan above can fail: a tile not in tests/triton_tiles.py, or a value it cannot read."""
    if ok is None:
        with pytest.raises(AssertionError, match="cannot tell which tile"):
            overrides(code, "snippet")
        return
    (_, t), = overrides(code, "snippet")
    assert (t in COMPILED) == ok


def test_triton_tiles_are_gpu_sized():
    """Each explicit tile keeps the logits accumulator within the tuned tables' registers per
    thread (a 16×1024 tile spilled; the compile check is the real test) and is not a table entry."""
    for b in (*OVERRIDES, _configs.INTERPRETER):
        assert b.m * b.n // (32 * b.num_warps) <= 32, b
        assert dataclasses.replace(b, splits=None) not in _configs.TABLES["logits_fwd"][0]


SASS_LOOP = """
        /*0080*/                   UTMALDG.2D [UR8], [UR4] ;
.L_x_2:
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR14+0x18000], R5 ;
        /*0110*/              @!P0 BRA `(.L_x_1) ;
.L_x_3:
        /*0120*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20].tnspB, R24 ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20].tnspB, R24, gsb0 ;
        /*0140*/                   @UP0 UTMALDG.2D [UR8], [UR14] ;
        /*0150*/                   @UP1 UTMALDG.2D [UR16], [UR20] ;
        /*0160*/              @!P0 BRA `(.L_x_2) ;
        /*0170*/                   STG.E [R2.64], R24 ;
.L_x_1:
        /*0180*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR14+0x18000], R5 ;
        /*0190*/              @!P0 BRA `(.L_x_1) ;
        /*01a0*/                   BRA `(.L_x_3) ;
"""
PTX_LOOP = """
$L__BB0_2:
\t// begin inline asm
\t@%p3 cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
\t// end inline asm
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r5], [%rd2, {%r2, %r3}], [%r4];
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd3, %rd4, %p1, 1, 1, 0, 1;
\t@%p5 bra $L__BB0_2;
\tst.global.b32 [%rd5], %r6;
"""


# Per listing, (text in its main loop, what replaces it) for each way to break it.
EDITS = {
    "sass": dict(sync=("HGMMA.64x128x16.F32.BF16", "HMMA.16816.F32.BF16"),
                 cp_async=("@UP0 UTMALDG.2D", "@UP0 LDGSTS.E.BYPASS.128"),
                 ld_global=("@UP1 UTMALDG.2D", "@UP1 LDG.E.128"),
                 one_tma=("@UP1 UTMALDG.2D [UR16], [UR20] ;", ""), outside=("BRA `(.L_x_", "BRA `(.L_y_")),
    "ptx": dict(sync=("wgmma.mma_async.sync.aligned", "mma.sync.aligned.m16n8k16"),
                cp_async=("@%p3 cp.async.bulk.tensor.2d", "@%p3 cp.async.cg.shared.global"),
                ld_global=("\tcp.async.bulk.tensor.2d", "\tld.global.v4.b32"),
                one_tma=("\tcp.async.bulk.tensor.2d", "\t// "), outside=("bra $L__BB0_", "bra $L__XX0_")),
}


@pytest.mark.parametrize("name,listing", [("sass", SASS_LOOP), ("ptx", PTX_LOOP)], ids=["sass", "ptx"])
def test_main_loop_check(name, listing):
    """Accepts the Hopper loop; rejects it with mma.sync, with either operand loaded by pointer
    (cp.async or ld.global), with one TMA load, and with the wgmma outside every loop."""
    syntax, edits = getattr(kernel_asm, name.upper()), EDITS[name]
    assert kernel_asm.main_loop(listing, syntax) is None
    expect = dict(sync="mma.sync in the kernel", cp_async="pointer loads", ld_global="pointer loads",
                  one_tma="1 TMA loads", outside="no loop issues")
    for edit, (old, new) in edits.items():
        assert old in listing, edit
        assert expect[edit] in (kernel_asm.main_loop(listing.replace(old, new), syntax) or ""), edit
