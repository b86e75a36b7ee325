"""The torch backend's row passes: the arg-max from groups of columns (``torch_backend._max_argmax``)."""
import pytest
import torch

from fastalign.ops import torch_backend


@pytest.mark.parametrize("width", [1, 63, 64, 65, 200])
def test_max_argmax_of_groups_is_the_first_column_at_the_max(width):
    """Small integers tie at the row max, also across groups of ``ARGMAX_GROUP`` columns and in the last, shorter
    group; a view of a wider buffer (rows not contiguous) as the one pass's blocks are."""
    g = torch.Generator().manual_seed(width)
    buffer = torch.randint(-3, 4, (40, width + 7), generator=g).double()
    z = buffer[:, :width]
    row_max, at_max = torch.empty(40, dtype=z.dtype), torch.empty(40, dtype=torch.int64)
    torch_backend._max_argmax(z, row_max, at_max)
    first = (z == z.max(1, keepdim=True).values).to(torch.uint8).argmax(1)  # torch.argmax: the first maximal
    assert torch.equal(row_max, z.max(1).values) and torch.equal(at_max, first)
    if width > torch_backend.ARGMAX_GROUP:  # some ties span two groups
        at = z == row_max.unsqueeze(1)
        last = width - 1 - at.flip(1).to(torch.uint8).argmax(1)
        assert ((first // torch_backend.ARGMAX_GROUP) != (last // torch_backend.ARGMAX_GROUP)).any()
