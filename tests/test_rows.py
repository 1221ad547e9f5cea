"""Rows on disk (ddkit.rows): what the merge, the selection and a rank's samples keep their images in."""

from __future__ import annotations

import gc

import pytest
import torch

from ddkit import rows
from ddkit.io import atomic_torch_save


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_gather_rows_is_the_concatenation_indexed_and_leaves_no_file(tmp_path, monkeypatch, chunk):
    """gather_rows (the merge's and the selection's copy of kept rows from memory-mapped shards) equals
    torch.cat(sources)[keep] for any order of keep, chunk size and source sizes, survives torch.save, and
    leaves nothing in its scratch directory."""
    monkeypatch.setattr(rows, "GATHER_ROWS", chunk)
    g = torch.Generator().manual_seed(0)
    sources = [torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8) for n in (5, 0, 7, 2)]
    whole = torch.cat(sources)
    torch.save({"images": whole}, tmp_path / "a.pt")  # sources as the merge reads them: memory-mapped
    mapped = torch.load(tmp_path / "a.pt", mmap=True, weights_only=True)["images"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for srcs in (sources, [mapped[:9], mapped[9:]]):
        for keep in (torch.randperm(14, generator=g)[:9], torch.arange(14).flip(0), torch.zeros(0, dtype=torch.long)):
            out = rows.gather_rows(srcs, keep, scratch)
            assert torch.equal(out, whole[keep])
            atomic_torch_save({"images": out}, tmp_path / "out.pt")
            assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True)["images"], whole[keep])
    assert list(scratch.iterdir()) == []
    with pytest.raises(IndexError, match=r"\[0, 14\)"):
        rows.gather_rows(sources, torch.tensor([14]), scratch)


def test_row_spool_grows_past_its_capacity_and_keeps_every_row(tmp_path):
    """A rank's images go to a RowSpool batch by batch: batches of any size, past any number of doublings,
    read back as their concatenation, also after the spool is closed and dropped; no file stays behind."""
    g = torch.Generator().manual_seed(1)
    spool = rows.RowSpool(tmp_path, (3, 2, 2), torch.uint8, capacity=2)
    batches = [torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8) for n in (1, 0, 3, 1, 9, 2)]
    for b in batches:
        spool.append(b)
    assert len(spool) == 16
    view = spool.rows()
    spool.close()
    del spool
    gc.collect()
    assert torch.equal(view, torch.cat(batches))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):  # a batch of another row shape is refused, not reshaped
        rows.RowSpool(tmp_path, (3, 2, 2), torch.uint8).append(torch.zeros(1, 3, 2, 3, dtype=torch.uint8))
