import pytest
import torch

from vidgen.nn import banded_block_mask, block_causal_mask, key_padding_mask


def test_block_size_one_is_causal():
    assert torch.equal(block_causal_mask(9, 1)[0, 0], torch.ones(9, 9, dtype=torch.bool).tril())


def test_block_causal_structure():
    m = block_causal_mask(7, 3)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_prefix_is_always_visible_and_sees_only_itself():
    m = block_causal_mask(10, 4, prefix_len=2)[0, 0]
    assert m[:, :2].all()  # everyone sees the prefix
    assert not m[:2, 2:].any()  # the prefix sees only the prefix
    assert torch.equal(m[2:, 2:], block_causal_mask(8, 4)[0, 0])


def test_banded_with_a_huge_window_is_block_causal():
    assert torch.equal(banded_block_mask(24, 4, window=100), block_causal_mask(24, 4))
    assert torch.equal(banded_block_mask(24, 2, window=6, group_size=8), block_causal_mask(24, 2))


def test_banded_structure():
    # Blocks of 2, groups (clips) of 4, window of 1 clip: clip c sees clip c-1 and itself
    # block-causally.
    m = banded_block_mask(12, 2, window=1, group_size=4)[0, 0]
    for i in range(12):
        for j in range(12):
            expected = j // 2 <= i // 2 and j // 4 >= i // 4 - 1
            assert bool(m[i, j]) == expected, (i, j)
    assert torch.equal(
        banded_block_mask(6, 1, window=0), torch.eye(6, dtype=torch.bool)[None, None]
    )


def test_key_padding_mask():
    # An empty batch is an empty mask (torch.as_tensor([]) is float: not refused as such).
    assert key_padding_mask([], 5).shape == (0, 1, 1, 5)
    m = key_padding_mask([3, 0, 5], 5)
    assert m.shape == (3, 1, 1, 5)
    assert m[0, 0, 0].tolist() == [True, True, True, False, False]
    assert not m[1].any() and m[2].all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: block_causal_mask(0, 2), "seq_len"),
        (lambda: block_causal_mask(8, 2, prefix_len=9), "prefix_len"),
        (lambda: banded_block_mask(8, 2, window=-1), "window"),
        (lambda: banded_block_mask(8, 4, window=1, group_size=6), "multiple of block_size"),
        # Counts: 4.5 made a mask of 5 rows, 1.5 uneven blocks, 0.5 another window.
        (lambda: block_causal_mask(4.5, 1), "seq_len must be an int"),
        (lambda: block_causal_mask(4, 1.5), "block_size must be an int"),
        (lambda: block_causal_mask(4, 1, prefix_len=1.0), "prefix_len must be an int"),
        (lambda: banded_block_mask(8, 2, window=0.5), "window must be an int"),
        (lambda: banded_block_mask(8, 2, window=1, group_size=4.0), "group_size must be an int"),
        (lambda: key_padding_mask([6], 5), "lengths"),
        # 1.5 allowed 2 keys and 0.2 allowed one: lengths are counts
        (lambda: key_padding_mask([1.5, 0.2], 3), "lengths must be integers"),
        (lambda: key_padding_mask([1, 2], 2.5), "key_len must be an int"),  # 3 keys' mask
        (lambda: key_padding_mask([1], -1), "key_len must be >= 0, got -1"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
