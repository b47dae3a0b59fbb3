"""Sliding-window dataset and loader."""
import numpy as np
import pytest
import torch

from gpt.data import TokenWindowDataset, create_dataloader, load_tokens, save_tokens


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(20)
    ds = TokenWindowDataset(tokens, max_length=4, stride=3)
    x, y = ds[2]
    assert x.tolist() == [6, 7, 8, 9]
    assert y.tolist() == [7, 8, 9, 10]
    assert x.dtype == torch.int64


def test_window_count_covers_array():
    ds = TokenWindowDataset(np.arange(20), max_length=4, stride=4)
    assert len(ds) == 4  # starts 0, 4, 8, 12; start 16 would need token 20
    last_x, last_y = ds[len(ds) - 1]
    assert last_y[-1].item() == 16
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_too_short_is_an_error():
    with pytest.raises(ValueError, match="shorter than one window"):
        TokenWindowDataset(np.arange(4), max_length=4, stride=1)


def test_memmap_round_trip(tmp_path):
    ids = np.array([0, 1, 50256, 12345, 7], dtype=np.int64)
    save_tokens(ids, tmp_path / "t.bin")
    loaded = load_tokens(tmp_path / "t.bin")
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    assert loaded.tolist() == ids.tolist()
    ds = TokenWindowDataset(loaded, max_length=2, stride=1)
    assert ds[2][1].tolist() == [12345, 7]


def test_save_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        save_tokens([70000], tmp_path / "t.bin")
    assert not list(tmp_path.iterdir())


def test_loader_order_depends_only_on_seed():
    tokens = np.arange(200)
    first = [x[:, 0].tolist() for x, _ in create_dataloader(tokens, batch_size=4, max_length=8, stride=8, seed=1)]
    again = [x[:, 0].tolist() for x, _ in create_dataloader(tokens, batch_size=4, max_length=8, stride=8, seed=1)]
    other = [x[:, 0].tolist() for x, _ in create_dataloader(tokens, batch_size=4, max_length=8, stride=8, seed=2)]
    assert first == again
    assert first != other


def test_drop_last_and_no_shuffle():
    tokens = np.arange(100)
    kept = list(create_dataloader(tokens, batch_size=5, max_length=8, stride=8, shuffle=False, drop_last=False))
    dropped = list(create_dataloader(tokens, batch_size=5, max_length=8, stride=8, shuffle=False, drop_last=True))
    assert [b[0].shape[0] for b in kept] == [5, 5, 2]
    assert [b[0].shape[0] for b in dropped] == [5, 5]
    assert kept[0][0][:, 0].tolist() == [0, 8, 16, 24, 32]


def test_epochs_differ_and_resume_mid_epoch_is_exact():
    tokens = np.arange(400)
    def firsts(**kw):
        return [x[:, 0].tolist() for x, _ in create_dataloader(tokens, batch_size=3, max_length=8, stride=8, seed=7, **kw)]
    epoch0, epoch1 = firsts(epoch=0), firsts(epoch=1)
    assert epoch0 != epoch1
    assert firsts(epoch=1, start_batch=4) == epoch1[4:]
