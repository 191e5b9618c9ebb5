import pytest
import torch

from degeneracy.stats import MatrixAccumulator, MomentAccumulator, check_finite


def test_moments_merge_equals_one_pass() -> None:
    x = torch.randn(100, 3, 4, dtype=torch.float64)
    whole = MomentAccumulator(4)
    whole.update(x)
    a, b = MomentAccumulator(4), MomentAccumulator(4)
    a.update(x[:37])
    b.update(x[37:])
    a.merge(b)
    flat = x.reshape(-1, 4)
    torch.testing.assert_close(a.gram, flat.T @ flat / 300, rtol=1e-13, atol=0)
    torch.testing.assert_close(a.mean, flat.mean(0), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(a.covariance, torch.cov(flat.T, correction=0), rtol=1e-12, atol=1e-14)
    assert a.count == whole.count == 300


def test_accumulator_errors() -> None:
    with pytest.raises(ValueError, match="no samples"):
        _ = MomentAccumulator(2).gram
    with pytest.raises(ValueError, match="width 2"):
        MomentAccumulator(2).update(torch.zeros(3, 5))
    with pytest.raises(TypeError):
        MomentAccumulator(2).merge(MatrixAccumulator(2))


def test_check_finite_names_place() -> None:
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in layer foo \(first at index \(1, 2\)"):
        check_finite(x, "layer foo")


def test_oversized_batches_split_their_labels_with_their_inputs() -> None:
    from degeneracy.data import iter_batches

    x = torch.arange(10.0)[:, None]
    y = torch.arange(10) * 10
    batches = list(iter_batches([(x, y, "meta", {"w": y.double()})], batch_size=4))
    assert [b.size for b in batches] == [4, 4, 2]
    for b in batches:
        labels, meta, extra = b.extras
        assert torch.equal(labels, b.inputs[:, 0].long() * 10)
        assert meta == "meta"
        assert torch.equal(extra["w"], labels.double())
