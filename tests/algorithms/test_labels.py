import pytest
import torch

from nnunet_ssl.algorithms.labels import class_argmax, class_max


def test_ties_go_to_the_lowest_class_index_as_in_the_argmax_definition():
    # (B=1, C=3, 2 x 2): hand-written ties in every position
    scores = torch.tensor([[[[1., 2.], [0., 5.]],
                            [[1., 2.], [3., 5.]],
                            [[0., 2.], [3., 5.]]]])
    values, labels = class_max(scores)
    assert labels.tolist() == [[[0, 0], [1, 0]]]
    assert values.tolist() == [[[1., 2.], [3., 5.]]]
    assert labels.dtype == torch.int64 and class_argmax(scores).tolist() == labels.tolist()


def test_nan_counts_as_the_maximum():
    scores = torch.tensor([[[0.1, float("nan")], [0.9, 0.5]]])  # (B=1, C=2, 2)
    values, labels = class_max(scores)
    assert labels.tolist() == [[1, 0]] and torch.isnan(values[0, 1]) and values[0, 0] == pytest.approx(0.9)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (2, 4, 3, 5, 6), (1, 1, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_same_labels_as_torch_argmax(shape, dtype):
    g = torch.Generator().manual_seed(0)
    # few distinct values, so ties are frequent
    scores = torch.randint(0, 3, shape, generator=g).to(dtype)
    values, labels = class_max(scores)
    assert torch.equal(labels, torch.argmax(scores, 1))
    assert torch.equal(values, scores.gather(1, labels.unsqueeze(1)).squeeze(1))
    assert labels.shape == shape[:1] + shape[2:] and values.dtype == dtype


def test_rejects_a_tensor_without_a_class_axis():
    with pytest.raises(ValueError, match=r"scores must be \(B, C, \*S\), got shape \(4,\)"):
        class_max(torch.zeros(4))
