"""The base weights' fingerprint (core/guard.py): exact on bit patterns, read at memory speed
(no conversion), and the same sum however the tensor is stored."""

import numpy as np
import pytest
import torch
from torch import nn

from lora_train_ext.core import guard as G
from lora_train_ext.core.errors import TrainingError


def _numpy_word_sum(t: torch.Tensor) -> int:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raw += b"\0" * (-len(raw) % 8)
    return int(np.frombuffer(raw, dtype=np.uint64).sum(dtype=np.uint64))


@pytest.mark.parametrize("make", [
    lambda: torch.randn(37, 11),                # 1628 bytes: a 4-byte tail
    lambda: torch.randn(5, 7).half(),           # 70 bytes: a 6-byte tail
    lambda: torch.randn(3).to(torch.bfloat16),  # 6 bytes: no whole word
    lambda: torch.arange(9),                    # int64 buffer
    lambda: torch.tensor([True, False, True]),  # bool
    lambda: torch.tensor(2.5),                  # 0-dim
    lambda: torch.randn(6, 4).t(),              # not contiguous
    lambda: torch.randn(1000)[3:803],           # storage offset of 12 bytes: copied in chunks
    lambda: torch.empty(0),
])
def test_sum_is_the_uint64_word_sum(make):
    t = make()
    assert G.word_sum(t) == _numpy_word_sum(t)


def test_unaligned_storage_is_summed_in_chunks_equal_to_aligned(monkeypatch):
    base = torch.randn(100_003)
    unaligned = base[1:]
    aligned = unaligned.clone()
    monkeypatch.setattr(G, "COPY_CHUNK", 64)
    assert len(G._word_sums(unaligned)) > 1000  # copied 64 bytes at a time
    assert G.word_sum(unaligned) == G.word_sum(aligned) == _numpy_word_sum(aligned)


def test_sum_does_not_depend_on_threads():
    t = torch.randn(1_000_003)
    threads = torch.get_num_threads()
    try:
        sums = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            sums.add(G.word_sum(t))
    finally:
        torch.set_num_threads(threads)
    assert len(sums) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_ulp_change_through_data_is_seen(dtype):
    """A write through `.data` bumps no version counter: only the sum can see it. A change of
    one element by its last bit, which a float sum of ~1e5 values would round away, changes it."""
    m = nn.Linear(300, 300).to(dtype)
    before = G.fingerprint([m])
    bits = m.weight.data.view(-1)[123:124].view(torch.int16 if dtype != torch.float32 else torch.int32)
    bits += 1
    after = G.fingerprint([m])
    assert after["0.weight"][:2] == before["0.weight"][:2]  # same storage, same version
    assert after["0.weight"][2] != before["0.weight"][2]
    assert after["0.bias"] == before["0.bias"]


def test_guard_verify_fails_on_a_data_write_and_passes_untouched():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    g = G.BaseGuard([m])
    g.freeze()
    g.restore()
    g.verify()  # untouched
    m[0].weight.data[0, 0] += 1e-7  # below a float32 sum's resolution over all weights
    with pytest.raises(TrainingError, match="base weights changed"):
        g.verify()


def test_accept_moved_takes_new_storage_with_equal_bytes():
    m = nn.Linear(8, 8)
    g = G.BaseGuard([m])
    g.freeze()
    m.weight.data = m.weight.data.clone()  # new storage, same values (an offload round trip)
    g.accept_moved()
    g.verify()
    m.bias.data = m.bias.data + 1
    g.accept_moved()  # different values keep the old entry
    with pytest.raises(TrainingError):
        g.verify()


def test_aligned_tensors_are_read_in_place():
    """The sums view the tensor's bytes: one int64 sum, no copy."""
    t = torch.randn(3 * G.COPY_CHUNK + 5)
    parts = G._word_sums(t)
    assert len(parts) == 2  # the whole words in one view, and the 4-byte tail
