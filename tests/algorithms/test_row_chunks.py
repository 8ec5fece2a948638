"""checkpointed_row_mean: chunked, activation-checkpointed means of row-separable losses, and chunk sizing."""
import torch

from nnunet_ssl.algorithms.row_chunks import checkpointed_row_mean, rows_per_chunk


def test_rows_per_chunk():
    assert rows_per_chunk(2 ** 20, 1000) == 1048
    assert rows_per_chunk(5, 100) == 1   # at least one row
    assert rows_per_chunk(10, 0) == 10   # no columns: treated as one


def _sum_of_squares(a):
    """Mean over rows of |a_i|^2, plus the mean of the first column as a statistic."""
    return (a ** 2).sum(1).mean(), {"first": a[:, 0].mean()}


def test_chunked_mean_value_gradient_and_statistics():
    a = torch.arange(10.0).view(5, 2).requires_grad_(True)  # rows (0,1) (2,3) (4,5) (6,7) (8,9)
    sizes = []

    def fn(x):
        if torch.is_grad_enabled():
            sizes.append(x.shape[0])
        return _sum_of_squares(x)

    loss, stats = checkpointed_row_mean(fn, (a,), chunk=2)
    assert sizes == [2, 2, 1]
    # |row|^2 = 1, 13, 41, 85, 145 -> mean 57; first column 0, 2, 4, 6, 8 -> mean 4
    assert float(loss.detach()) == 57.0 and float(stats["first"]) == 4.0 and not stats["first"].requires_grad
    loss.backward()
    torch.testing.assert_close(a.grad, 2 * a.detach() / 5)  # d/da of sum(a^2) / 5


def test_several_row_tensors_and_the_unchunked_path():
    a = torch.tensor([[1.0], [2.0], [4.0]])
    w = torch.tensor([1.0, 0.0, 2.0])
    fn = lambda x, y: ((x[:, 0] * y).mean(), {})  # noqa: E731
    loss, _ = checkpointed_row_mean(fn, (a, w), chunk=1)
    assert float(loss) == (1.0 + 0.0 + 8.0) / 3
    whole = (torch.tensor(7.0), {"s": torch.tensor(1.0)})
    assert checkpointed_row_mean(lambda x, y: whole, (a, w), chunk=3) is whole  # N <= chunk: fn itself
