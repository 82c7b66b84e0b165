"""gridfl's own backward formulations give ATen's gradients (eager, on real tensors)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gridfl.compiler import decompositions  # noqa: E402

aten = torch.ops.aten


@pytest.mark.parametrize(("dim", "index"), [(1, -1), (1, 0), (0, 2), (-1, 1), (2, -3)])
def test_select_backward_pads_the_selected_gradient(dim, index):
    sizes = [4, 5, 3]
    g = torch.randn([s for d, s in enumerate(sizes) if d != dim % 3])
    got = decompositions._select_backward(g, sizes, dim, index)
    want = aten.select_backward.default(g, sizes, dim, index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("padding_idx", [-1, 0, 3])
def test_embedding_backward_sums_rows_per_index(padding_idx):
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 6, (4, 7), generator=g)
    indices[0, :3] = 3  # repeated rows sum
    grad = torch.randn(4, 7, 5, generator=g)
    got = decompositions._embedding_dense_backward(grad, indices, 6, padding_idx, False)
    want = aten.embedding_dense_backward.default(grad, indices, 6, padding_idx, False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if padding_idx >= 0:
        assert not got[padding_idx].any()


def test_embedding_backward_drops_indices_out_of_range():
    """Eager PyTorch refuses them in the forward; a plan (which cannot raise) gives
    them no gradient."""
    grad = torch.ones(3, 2)
    got = decompositions._embedding_dense_backward(grad, torch.tensor([1, 9, -2]), 4, -1,
                                                   False)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0], [1, 1], [0, 0], [0, 0]]))
