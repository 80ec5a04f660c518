"""The compiled kernels' cache is trusted only if it is ours: a library another user could have written is never
loaded (it would run as us), a damaged one falls back to torch, leftovers of killed builds go, a cached library
starts without running the compiler, and the C wrappers refuse tensors that would make them read past a buffer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from starqa import kernels
from starqa.store.context_kv import chunk_starts_for

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or not kernels.available(),
                                reason=f"no decode kernels here: {kernels.unavailable_reason()}")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE* f = fopen("%(marker)s", "w");
    if (f) { fputs("ran", f); fclose(f); }
}
int starqa_kernels_available(void) { return 1; }
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """kernels._library() computed afresh under this test's environment (and afresh again after it); the
    warnings it gives, recorded."""
    warned: list[str] = []
    monkeypatch.setattr(kernels.report, "warn", warned.append)
    kernels._library.cache_clear()
    yield warned
    kernels._library.cache_clear()


def _plant(folder, marker) -> str:
    """A library named as the cache would name this machine's build, whose constructor writes `marker`."""
    source = folder.parent / "planted.c"
    source.write_text(PLANTED % {"marker": marker})
    target = folder / f"cpu_decode-{kernels._cache_key(kernels._compiler())}.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(target)], check=True)
    return target


def test_a_library_planted_in_a_folder_others_can_write_is_not_loaded(fresh, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a shared folder: any local user could have put the library there
    marker = tmp_path / "planted-code-ran"
    planted = _plant(shared, marker)
    monkeypatch.setenv("STARQA_KERNEL_CACHE", str(shared))
    assert kernels.available()  # built afresh, privately
    assert not marker.exists()  # the planted library's code never ran
    assert len(fresh) == 1 and f"not using the kernel cache {shared}: others can write to it" in fresh[0]
    assert planted.exists() and sorted(p.name for p in shared.iterdir()) == [planted.name]  # nothing written there
    assert kernels.linear_bf16(torch.ones(1, 32, dtype=torch.bfloat16),
                               torch.ones(2, 32, dtype=torch.bfloat16)).tolist() == [[32.0, 32.0]]


def test_a_library_others_can_write_in_our_own_folder_is_not_loaded(fresh, monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    marker = tmp_path / "planted-code-ran"
    planted = _plant(folder, marker)
    planted.chmod(0o777)
    monkeypatch.setenv("STARQA_KERNEL_CACHE", str(folder))
    assert kernels.available() and not marker.exists()
    assert len(fresh) == 1 and "others can write to cpu_decode-" in fresh[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_library_or_folder_of_another_user_is_not_loaded(fresh, monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    marker = tmp_path / "planted-code-ran"
    planted = _plant(folder, marker)
    os.chown(planted, 4242, 4242)  # a file of uid 4242's, in a folder of ours that only we can write
    monkeypatch.setenv("STARQA_KERNEL_CACHE", str(folder))
    assert kernels.available() and not marker.exists()
    assert "cpu_decode-" in fresh[-1] and "belongs to another user (uid 4242)" in fresh[-1]
    os.chown(planted, 0, 0)
    os.chown(folder, 4242, 4242)  # now the folder is another user's
    kernels._library.cache_clear()
    assert kernels.available() and not marker.exists()
    assert "it belongs to another user (uid 4242)" in fresh[-1]


def test_a_relative_cache_folder_is_made_absolute(fresh, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STARQA_KERNEL_CACHE", "relative/kernels")
    assert kernels.cache_folder() == tmp_path / "relative" / "kernels"
    assert kernels.cache_folder().is_absolute()
    assert kernels.available() and fresh == []
    assert [p.name for p in (tmp_path / "relative" / "kernels").iterdir()] == [
        f"cpu_decode-{kernels._cache_key(kernels._compiler())}.so"]
    assert (tmp_path / "relative" / "kernels").stat().st_mode & 0o777 == 0o700


def test_a_library_without_the_kernels_falls_back_to_torch(fresh, monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    _plant(folder, tmp_path / "marker")  # ours, trusted, but only starqa_kernels_available in it
    monkeypatch.setenv("STARQA_KERNEL_CACHE", str(folder))
    assert kernels.available() is False
    assert "lacks linear_bf16, rms_norm_bf16" in kernels.unavailable_reason()


def test_leftovers_of_a_killed_build_are_removed_and_a_build_in_progress_kept(fresh, monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    stale, current = folder / ".tmp-0123456789abcdef-deadbeef.so", folder / ".tmp-0123456789abcdef-feedf00d.so"
    stale.write_bytes(b"half a library")
    current.write_bytes(b"being written")
    hour_ago = stale.stat().st_mtime - 3600
    os.utime(stale, (hour_ago, hour_ago))
    monkeypatch.setenv("STARQA_KERNEL_CACHE", str(folder))
    assert kernels.available()
    assert not stale.exists() and current.exists()


def test_a_cached_library_is_loaded_without_running_the_compiler(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("STARQA_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kernels.available()  # built once
    kernels._library.cache_clear()
    ran: list = []
    real_run = subprocess.run
    monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: ran.append(a) or real_run(*a, **k))
    assert kernels.available()  # the next start
    assert ran == []


# ------------------------------------------------------------------------------------------------ wrong calls

def test_the_wrappers_refuse_shapes_that_would_read_past_a_buffer():
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not take x"):
        kernels.linear_bf16(x, torch.ones(8, 32, dtype=torch.bfloat16))  # weight narrower than x
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.linear_bf16(x, torch.ones(8, 64))
    with pytest.raises(ValueError, match="residual"):
        kernels.linear_bf16(x, torch.ones(8, 64, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rms_norm_bf16: weight"):
        kernels.rms_norm_bf16(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    qkv = torch.ones(2, 3 * 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rope_bf16_"):
        kernels.rope_bf16_(qkv, 2, 64, torch.ones(2, 64, dtype=torch.bfloat16), torch.ones(2, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rope_bf16_"):
        kernels.rope_bf16_(qkv, 2, 64, torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(1, 64, dtype=torch.bfloat16))

    q = torch.randn(2, 3, 64)
    keys = torch.randn(2, 300, 64)
    starts = chunk_starts_for([(0, 300)], 128)
    with pytest.raises(ValueError, match="values"):
        kernels.decode_attention(q, keys, torch.randn(2, 200, 64), starts)
    with pytest.raises(ValueError, match="keys"):
        kernels.decode_attention(torch.randn(3, 3, 64), keys, keys.clone(), starts)  # more query heads than keys'
    with pytest.raises(ValueError, match="chunk_starts"):
        kernels.decode_attention(q, keys, keys.clone(), starts.long())
    key_q = torch.zeros(2, 300, 64, dtype=torch.int8)
    good_scales = (torch.ones(2, starts.numel() - 1, 64), torch.ones(2, 300))
    kernels.decode_attention(q, key_q, key_q.clone(), starts, key_scales=good_scales[0], value_scales=good_scales[1])
    with pytest.raises(ValueError, match="key_scales"):
        kernels.decode_attention(q, key_q, key_q.clone(), starts, key_scales=torch.ones(2, 1, 64),
                                 value_scales=good_scales[1])
    with pytest.raises(ValueError, match="value_scales"):
        kernels.decode_attention(q, key_q, key_q.clone(), starts, key_scales=good_scales[0],
                                 value_scales=torch.ones(2, 30))
    with pytest.raises(ValueError, match="local keys"):
        kernels.decode_attention(q, keys, keys.clone(), starts, local_keys=torch.randn(2, 5, 64),
                                 local_values=torch.randn(2, 4, 64))


def test_chunks_that_start_before_the_keys_are_refused_by_the_kernel():
    """[-16, 48, 64]: every chunk 1-256 keys long and the last ending at n, but the first starts 16 keys before the
    buffer: check_segment refuses it (the kernel's own check, whatever called it)."""
    q, keys = torch.randn(1, 1, 64), torch.randn(1, 64, 64)
    with pytest.raises(RuntimeError, match=r"decode_attention failed \(-2\)"):
        kernels.decode_attention(q, keys, keys.clone(), torch.tensor([-16, 48, 64], dtype=torch.int32))
    out, _, _ = kernels.decode_attention(q, keys, keys.clone(), torch.tensor([0, 48, 64], dtype=torch.int32))
    assert torch.isfinite(out).all()


def test_every_file_the_build_reads_is_in_its_cache_key(monkeypatch, tmp_path):
    """A changed source or shared header must give a new library name: a build keyed on the .c files alone would go
    on loading a library compiled from the old header."""
    compiler = kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    before = kernels._cache_key(compiler)
    for original in [*kernels._SOURCES, *kernels._HEADERS]:
        copy = tmp_path / original.name
        copy.write_bytes(original.read_bytes() + b"\n/* changed */\n")
        monkeypatch.setattr(kernels, "_SOURCES", [copy if p == original else p for p in kernels._SOURCES])
        monkeypatch.setattr(kernels, "_HEADERS", [copy if p == original else p for p in kernels._HEADERS])
        assert kernels._cache_key(compiler) != before, original.name
        monkeypatch.undo()
    included = {name for source in kernels._SOURCES
                for name in re.findall(r'#include "([^"]+)"', source.read_text(encoding="utf-8"))}
    assert included == {header.name for header in kernels._HEADERS}


@pytest.mark.parametrize("without", [["-mno-avx512bf16"], ["-mno-avx512vnni"], ["-mno-avx512bf16", "-mno-avx512vnni"]])
def test_a_cpu_without_bf16_or_vnni_still_gets_every_symbol(tmp_path, without):
    """Built for an AVX-512 CPU that lacks AVX512-BF16 or -VNNI (Skylake-X, Ice Lake), the library still exports
    every function the Python side checks for (a missing one would turn all the kernels off) and says which
    quantized kernels it offers."""
    import ctypes

    if not kernels.available():
        pytest.skip(f"no decode kernels here: {kernels.unavailable_reason()}")
    target = tmp_path / "reduced.so"
    subprocess.run([kernels._compiler(), *kernels._FLAGS, *without, *map(str, kernels._SOURCES), "-o", str(target),
                    "-lm"], check=True, capture_output=True)
    library = ctypes.CDLL(str(target))
    assert [name for name in kernels._SYMBOLS if not hasattr(library, name)] == []
    assert library.starqa_kernels_available() == 1
    assert library.starqa_quant_available() == int("-mno-avx512bf16" not in without)
    assert library.starqa_quant_x8_available() == 0
