"""k-means and the codebook quantizer: scikit-learn reference, codebook values, gradients, frozen entries, resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from lightning_quant.core.codebook import (
    CodebookQuantizer,
    fit_shared_codebook,
    index_bits_for,
    power_of_two_entries,
    share_codebook,
)
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.kmeans import kmeans, kmeans_plus_plus
from lightning_quant.core.quantizers import QUANTIZER_KINDS, build_weight_quantizer
from lightning_quant.surgery.spec import LayerSpec


def _blobs(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, d))
    return centres[rng.integers(0, k, size=n)] + rng.normal(size=(n, d))


# ---------------------------------------------------------------------------------------------------------------
# k-means against scikit-learn
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "d", "k", "seed"), [(400, 1, 5, 0), (300, 9, 8, 1), (1000, 4, 16, 2), (50, 2, 3, 3)])
def test_kmeans_matches_sklearn_from_the_same_init(n, d, k, seed):
    x = _blobs(n, d, k, seed)
    init = x[np.random.default_rng(seed + 10).choice(n, size=k, replace=False)]
    ref = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x)
    ours = kmeans(torch.from_numpy(x), torch.from_numpy(init), iterations=100, batch_size=64)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-5)
    np.testing.assert_allclose(ours.centers.numpy(), ref.cluster_centers_, rtol=1e-6, atol=1e-8)
    assert (ours.labels.numpy() == ref.labels_).all()


def test_kmeans_fixed_centres_never_move_and_plusplus_is_seeded():
    x = torch.from_numpy(_blobs(200, 1, 4, 5))
    init = torch.tensor([[0.0], [1.0], [-3.0], [5.0]], dtype=x.dtype)
    fixed = torch.tensor([True, False, False, False])
    result = kmeans(x, init, fixed=fixed)
    assert result.centers[0, 0].item() == 0.0
    assert not torch.equal(result.centers[1:], init[1:])
    assert torch.equal(kmeans_plus_plus(x, 4, seed=3), kmeans_plus_plus(x, 4, seed=3))
    assert not torch.equal(kmeans_plus_plus(x, 4, seed=3), kmeans_plus_plus(x, 4, seed=4))


def test_kmeans_rejects_more_centres_than_points():
    with pytest.raises(QuantizationConfigError, match=r"`init` = 5 centres for 3 points"):
        kmeans(torch.zeros(3, 2), 5)


# ---------------------------------------------------------------------------------------------------------------
# the codebook quantizer
# ---------------------------------------------------------------------------------------------------------------
def _conv_weight(seed: int = 0, shape=(8, 4, 3, 3)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vector", ["scalar", "kernel"])
def test_after_fitting_weights_take_only_codebook_values_on_its_grid(vector):
    w = _conv_weight()
    q = CodebookQuantizer(w.shape, num_entries=8, vector=vector, codebook_bits=6)
    out = q(w)
    book = q.effective_codebook().detach()
    rows = out.detach().reshape(-1, book.shape[1])
    # every weight (or kernel) is one of the entries
    assert all(bool((row == book).all(dim=1).any()) for row in rows)
    # the entries lie on the 6-bit symmetric grid
    codes = q.codebook_codes()
    assert torch.equal(codes.float() * q.codebook_scale, book) and codes.abs().max() <= 32
    # codes and values agree with forward; storage is index bits per vector
    assert torch.equal(q.dequantize(q.int_repr(w)), out.detach())
    vectors = w.numel() // (9 if vector == "kernel" else 1)
    assert q.payload_bits(w) == vectors * 3
    assert q.side_bits() == 8 * book.shape[1] * 6 + 32


def test_entry_gradients_are_summed_over_the_weights_that_use_them():
    w = _conv_weight(1).requires_grad_(True)
    q = CodebookQuantizer(w.shape, num_entries=4, vector="kernel")
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    (q(w) * upstream).sum().backward()
    per_kernel = upstream.reshape(-1, 9)
    expected = torch.zeros(4, 9).index_add_(0, q.indices, per_kernel)
    torch.testing.assert_close(q.codebook.grad, expected, rtol=1e-6, atol=1e-6)
    # the float weight gets the straight-through gradient of its entry
    torch.testing.assert_close(w.grad, upstream)


def _train(q: CodebookQuantizer, w: torch.Tensor, steps: int, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        target = torch.randn(w.shape, generator=gen)
        opt.zero_grad()
        ((q(w) - target) ** 2).mean().backward()
        opt.step()


def test_frozen_entries_do_not_move_under_momentum_and_weight_decay_and_resume_bit_identically():
    torch.manual_seed(0)
    w = torch.nn.Parameter(_conv_weight(3, (16, 1, 1, 1)).reshape(16))
    q = CodebookQuantizer(w.shape, num_entries=5, codebook_bits=None)
    q(w)
    opt = torch.optim.SGD([q.codebook, w], lr=0.1, momentum=0.9, weight_decay=0.1)
    _train(q, w, 3, opt, seed=0)  # momentum builds up on every entry
    q.freeze([0, 2])
    frozen_before = q.effective_codebook().detach()[[0, 2]].clone()
    moving_before = q.effective_codebook().detach()[[1, 3, 4]].clone()
    state = io.BytesIO()
    torch.save({"q": q.state_dict(), "w": w.detach().clone(), "opt": opt.state_dict()}, state)
    _train(q, w, 5, opt, seed=1)
    after = q.effective_codebook().detach()
    assert torch.equal(after[[0, 2]], frozen_before)
    assert not torch.equal(after[[1, 3, 4]], moving_before)
    # weights of frozen entries keep exactly their entry's value
    values = q(w).detach()
    for e in (0, 2):
        assert torch.all(values[q.indices == e] == frozen_before[[0, 2].index(e), 0])
    # resume: a fresh quantizer, weight and optimizer from the saved state continue bit-identically
    state.seek(0)
    saved = torch.load(state, weights_only=True)
    q2 = CodebookQuantizer(w.shape, num_entries=5, codebook_bits=None)
    q2.load_state_dict(saved["q"])
    w2 = torch.nn.Parameter(saved["w"])
    opt2 = torch.optim.SGD([q2.codebook, w2], lr=0.1, momentum=0.9, weight_decay=0.1)
    opt2.load_state_dict(saved["opt"])
    _train(q2, w2, 5, opt2, seed=1)
    assert torch.equal(q2.effective_codebook(), q.effective_codebook())
    assert torch.equal(q2(w2), q(w))


def test_partial_mode_keeps_weights_of_unfrozen_entries_in_float():
    w = torch.linspace(-1, 1, 40)
    q = CodebookQuantizer(w.shape, num_entries=3, fixed_values=(0.0,))
    q(w)
    assert 0.0 in q.codebook.detach().flatten().tolist()
    q.set_partial(True)
    assert torch.equal(q(w), w)  # nothing frozen yet: all float
    zero = int((q.codebook.detach().flatten() == 0.0).nonzero()[0])
    q.freeze([zero])
    out = q(w)
    assigned = q.indices == zero
    assert torch.all(out[assigned] == 0.0) and torch.equal(out[~assigned], w[~assigned])
    assert not q.complete and q.uniform_grid() is None
    assert q.payload_bits(w) == int(assigned.sum()) * 2 + int((~assigned).sum()) * 32
    q.freeze([0, 1, 2])
    assert q.complete


def test_refit_keeps_frozen_entries_and_their_weights():
    w = _conv_weight(4, (64,))
    q = CodebookQuantizer(w.shape, num_entries=4)
    q(w)
    q.freeze([1])
    before = q.effective_codebook().detach().clone()
    kept = q.indices == 1
    q.fit(w + 0.3)
    assert torch.equal(q.effective_codebook().detach()[1], before[1])
    assert torch.equal(q.indices == 1, kept)
    q.freeze(torch.tensor([True, False, False, False]))
    assert q.frozen.tolist() == [1, 1, 0, 0]
    assert q.reassign(w) >= 0 and torch.equal(q.indices == 1, kept)


def test_codebook_errors_name_the_problem():
    with pytest.raises(QuantizationConfigError, match=r"A codebook of 16 entries is larger than the 8 kernels"):
        CodebookQuantizer((2, 4, 3, 3), num_entries=16, vector="kernel")
    with pytest.raises(QuantizationConfigError, match=r"`vector='kernel'` needs a convolution weight"):
        CodebookQuantizer((4, 4), num_entries=2, vector="kernel")
    with pytest.raises(QuantizationConfigError, match=r"`index_bits` must be an integer in \[5, 8\]"):
        CodebookQuantizer((64,), num_entries=17, index_bits=4)
    spec = LayerSpec(weight_kind="codebook", weight_bits=4)
    with pytest.raises(QuantizationConfigError, match=r"Layer 'conv': A codebook of 16 entries is larger"):
        kernel_spec = LayerSpec(weight_kind="codebook", weight_bits=4, codebook_vector="kernel")
        build_weight_quantizer(torch.zeros(2, 1, 2, 2), kernel_spec, "Layer 'conv'")
    assert isinstance(build_weight_quantizer(torch.zeros(4, 8), spec), CodebookQuantizer)


def test_layer_spec_validates_the_quantizer_kind():
    assert {"uniform", "codebook"} <= set(QUANTIZER_KINDS)
    with pytest.raises(QuantizationConfigError, match=r"`weight_kind` must be one of \['codebook', 'uniform'\]"):
        LayerSpec(weight_kind="lattice")
    with pytest.raises(QuantizationConfigError, match=r"apply to codebook quantizers only"):
        LayerSpec(codebook_bits=6)
    with pytest.raises(QuantizationConfigError, match=r"`codebook_size` must be an integer in \[1, 2\*\*weight_bits\]"):
        LayerSpec(weight_kind="codebook", weight_bits=2, codebook_size=5)
    spec = LayerSpec(weight_kind="codebook", weight_bits=5, codebook_size=17, codebook_zero=True)
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert index_bits_for(17) == 5


# ---------------------------------------------------------------------------------------------------------------
# shared codebooks
# ---------------------------------------------------------------------------------------------------------------
def _shared_pair(entries: int = 8) -> tuple[list[CodebookQuantizer], list[torch.Tensor]]:
    weights = [_conv_weight(5, (4, 2, 3, 3)), _conv_weight(6, (6, 4, 3, 3))]
    quantizers = [
        CodebookQuantizer(w.shape, num_entries=entries, vector="kernel", codebook_bits=6, shared=True) for w in weights
    ]
    share_codebook(quantizers)
    return quantizers, weights


def test_shared_codebook_is_one_parameter_fitted_on_all_kernels_against_sklearn():
    (a, b), (wa, wb) = _shared_pair()
    # the member has no codebook state of its own: one Parameter, one step size, saved once
    assert b.codebook is a.codebook and b.codebook_scale is a.codebook_scale and b.codebook_owner is a
    # (its own per-kernel state stays: indices and the frozen-kernel mask)
    assert set(b.state_dict()) == {"indices", "vector_frozen", "partial", "initialized"}
    assert [n for n, _ in torch.nn.ModuleList([a, b]).named_parameters()] == ["0.codebook"]
    inertia = fit_shared_codebook([a, b], [wa, wb], iterations=100)
    points = torch.cat([wa.reshape(-1, 9), wb.reshape(-1, 9)]).double().numpy()
    init = kmeans_plus_plus(torch.cat([wa.reshape(-1, 9), wb.reshape(-1, 9)]), 8, seed=a.seed).double().numpy()
    ref = KMeans(n_clusters=8, init=init, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(points)
    assert inertia == pytest.approx(ref.inertia_, rel=1e-4)
    assert np.array_equal(torch.cat([a.indices, b.indices]).numpy(), ref.labels_)
    # every kernel of both layers is one entry of the one 6-bit codebook
    book = a.effective_codebook().detach()
    for q, w in ((a, wa), (b, wb)):
        out = q(w).detach().reshape(-1, 9)
        assert torch.equal(out, book[q.indices])
    assert torch.equal(a.codebook_codes().float() * a.codebook_scale, book)
    # gradients of both layers' kernels sum into the one Parameter
    upstream = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i, w in enumerate((wa, wb))]
    ((a(wa) * upstream[0]).sum() + (b(wb) * upstream[1]).sum()).backward()
    expected = torch.zeros(8, 9).index_add_(0, a.indices, upstream[0].reshape(-1, 9))
    expected.index_add_(0, b.indices, upstream[1].reshape(-1, 9))
    torch.testing.assert_close(a.codebook.grad, expected, rtol=1e-5, atol=1e-5)


def test_shared_codebook_is_stored_once_and_reloads():
    (a, b), (wa, wb) = _shared_pair()
    fit_shared_codebook([a, b], [wa, wb])
    assert b.side_tensors() == {} and b.side_bits() == 0
    assert a.side_bits() == 8 * 9 * 6 + 32 and b.payload_bits(wb) == 24 * 3
    # packed-file round trip: the owner loads the codebook, the member its indices
    (c, d), _ = _shared_pair()
    c.load_codes(a.int_repr(wa), {"codebook": a.codebook_codes(), "codebook_scale": a.codebook_scale.clone()})
    d.load_codes(b.int_repr(wb), {})
    assert torch.equal(d(wb), b(wb)) and torch.equal(c(wa), a(wa))
    # a reassignment uses the shared entries; freezing through a member freezes the owner's entry
    assert b.reassign(wb + 0.05) >= 0
    b.freeze([2])
    assert a.frozen.tolist()[2] == 1 and torch.equal(b.effective_codebook(), a.effective_codebook())


def test_shared_codebook_errors_name_the_fix():
    (a, b), (wa, _wb) = _shared_pair()
    with pytest.raises(QuantizationConfigError, match=r"shares its codebook with other layers.*fit_shared_codebook"):
        a(wa)  # never fitted: a member of a shared codebook cannot fit itself
    with pytest.raises(QuantizationConfigError, match=r"one weight per quantizer"):
        fit_shared_codebook([a, b], [wa])
    other = CodebookQuantizer((4, 2, 3, 3), num_entries=4, vector="kernel", codebook_bits=6, shared=True)
    with pytest.raises(QuantizationConfigError, match=r"\(entries, vector, entry size, codebook bits\) are \(4, "):
        share_codebook([a, other], ["Layer 'a'", "Layer 'other'"])
    with pytest.raises(QuantizationConfigError, match=r"was not built to share its codebook"):
        share_codebook([a, CodebookQuantizer((4, 2, 3, 3), num_entries=8, vector="kernel", codebook_bits=6)])
    small = [CodebookQuantizer((1, 2, 3, 3), num_entries=4, vector="kernel", shared=True) for _ in range(2)]
    with pytest.raises(QuantizationConfigError, match=r"A shared codebook of 4 entries is larger than the 3 kernels"):
        share_codebook([*small[:1], CodebookQuantizer((1, 1, 3, 3), num_entries=4, vector="kernel", shared=True)])
    share_codebook(small)  # 4 kernels in all for 4 entries: fine
    with pytest.raises(QuantizationConfigError, match=r"`codebook_share` must be a non-empty group name"):
        LayerSpec(weight_kind="codebook", weight_bits=2, codebook_share="")
    with pytest.raises(QuantizationConfigError, match=r"apply to codebook quantizers only"):
        LayerSpec(codebook_share="g")


def test_rescale_follows_entries_trained_past_the_grid():
    w = _conv_weight(7)
    q = CodebookQuantizer(w.shape, num_entries=4, vector="kernel", codebook_bits=6)
    q(w)
    with torch.no_grad():
        q.codebook[0].mul_(3.0)  # an entry trained far past the largest one of the fit
    clipped = q.effective_codebook().detach()
    assert clipped[0].abs().max() <= 32 * q.codebook_scale  # clamped to the old grid
    assert q.rescale() and not q.rescale()  # changed once, then stable
    book = q.effective_codebook().detach()
    torch.testing.assert_close(book[0].abs().max(), q.codebook.detach()[0].abs().max())
    assert (book - q.codebook.detach()).abs().max() <= q.codebook_scale / 2 + 1e-7
    # frozen entries keep their values: no rescale then
    q.freeze([1])
    with torch.no_grad():
        q.codebook[0].mul_(2.0)
    assert not q.rescale()


# ---------------------------------------------------------------------------------------------------------------
# incremental quantization (SLQ/MLQ): frozen weights, fits into frozen entries, power-of-two entries
# ---------------------------------------------------------------------------------------------------------------
def _fitted_zero_codebook(n: int = 200, k: int = 5, seed: int = 6) -> tuple[torch.Tensor, CodebookQuantizer]:
    w = _conv_weight(seed, (n,))
    q = CodebookQuantizer(w.shape, num_entries=k, fixed_values=(0.0,))
    q.fit(w)
    return w, q


def test_freeze_vectors_freezes_exactly_those_weights_and_their_entries():
    w, q = _fitted_zero_codebook()
    q.set_partial(True)
    target = int((q.indices == 1).nonzero()[0])  # one weight of entry 1; entry 1 has others
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[[target, 5, 6]] = True
    assert q.freeze_vectors(mask) == 3 and q.freeze_vectors(mask) == 0
    assert torch.equal(q.frozen_vector_mask, mask)
    assert set(torch.nonzero(q.frozen_mask).flatten().tolist()) == set(q.indices[mask].tolist())
    out = q(w)
    book = q.effective_codebook().detach().flatten()
    assert torch.equal(out[mask], book[q.indices[mask]])  # frozen weights take their entry's value
    assert torch.equal(out[~mask], w[~mask])  # the others (entry 1's other weights included) stay float
    assert q.payload_bits(w) == 3 * 3 + (w.numel() - 3) * 32 and not q.complete
    # the frozen weights get no gradient
    wp = w.clone().requires_grad_(True)
    q(wp).sum().backward()
    assert torch.equal(wp.grad, (~mask).float())
    with pytest.raises(QuantizationConfigError, match=r"`vectors` must be a boolean mask of the 200 vectors"):
        q.freeze_vectors(torch.ones(10, dtype=torch.bool))


def test_fit_into_frozen_entries_keeps_frozen_weights_and_values():
    w, q = _fitted_zero_codebook()
    q.set_partial(True)
    mask = (q.indices <= 1) & (torch.arange(w.numel()) % 2 == 0)  # part of entries 0 and 1
    q.freeze_vectors(mask)
    frozen_entries = q.frozen_mask.clone()
    values, kept = q.frozen_values.clone(), q.indices[mask].clone()
    moved = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    q.fit(moved, iterations=10, assign_to_frozen=True)
    assert torch.equal(q.indices[mask], kept) and torch.equal(q.frozen_mask, frozen_entries)
    assert torch.equal(q.effective_codebook()[frozen_entries], values[frozen_entries])
    assert q.effective_codebook()[0, 0].item() == 0.0
    # free weights are at their nearest entry among all entries, frozen ones included
    book = q.effective_codebook().detach().flatten()
    nearest = (moved[~mask, None] - book[None]).abs().argmin(dim=1)
    assert torch.equal(book[q.indices[~mask]], book[nearest])
    assert bool(frozen_entries[q.indices[~mask]].any())
    # without assign_to_frozen, free weights go to free entries only (the default, as before)
    q.fit(moved)
    assert not bool(q.frozen_mask[q.indices[~mask]].any())


def test_fit_from_given_init_and_assign_only():
    w = torch.tensor([-1.0, -0.9, -0.55, -0.45, 0.01, 0.02, 0.4, 0.6, 1.1])
    q = CodebookQuantizer(w.shape, num_entries=5, fixed_values=(0.0,))
    init = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5])
    q.fit(w, init=init, iterations=0)  # assignment only: the entries are the init
    assert torch.equal(q.codebook.detach().flatten(), init)
    assert q.indices.tolist() == [2, 2, 4, 4, 0, 0, 3, 3, 1]
    q.fit(w, init=init, iterations=10)
    assert q.codebook.detach().flatten().tolist() == pytest.approx([0.0, 1.1, -0.95, 0.5, -0.5])
    with pytest.raises(QuantizationConfigError, match=r"`init` must hold one starting value per entry, shape \[5, 1\]"):
        q.fit(w, init=torch.zeros(4))
    with pytest.raises(QuantizationConfigError, match=r"`init` row 0 must be the fixed value 0.0"):
        q.fit(w, init=torch.ones(5))
    # fewer weights left to cluster than entries: assigned to the nearest entry, nothing moves
    mask = torch.tensor([True, True, True, True, True, True, False, False, True])
    q.set_partial(True)
    q.freeze_vectors(mask)
    before = q.effective_codebook().clone()
    q.fit(w + 0.2, assign_to_frozen=True)
    assert torch.equal(q.effective_codebook(), before)


def test_snap_writes_the_values_of_frozen_weights_into_the_float_weight():
    w, q = _fitted_zero_codebook()
    q.set_partial(True)
    mask = torch.arange(w.numel()) % 3 == 0
    q.freeze_vectors(mask)
    weight = w.clone()
    q.snap(weight)
    assert torch.equal(weight, q(w)) and torch.equal(weight[~mask], w[~mask])
    q.freeze([0, 1, 2, 3, 4])
    q.snap(weight)
    assert q.complete and torch.equal(weight, q(w)) and torch.equal(weight, q.dequantize(q.int_repr(w)))


def test_power_of_two_entries():
    x = torch.tensor([0.26, -0.7, 0.01])
    # SLQ's initial centroids: n_max = 2**floor(log2 0.7) = 0.5
    assert power_of_two_entries(x, 7).flatten().tolist() == [0.0, 0.5, -0.5, 0.25, -0.25, 0.125, -0.125]
    # INQ: n1 = floor(log2(4 * 0.7 / 3)) = -1 as well; 0.74 takes n1 = 0 (4/3 * 0.74 > 0.98... >= 1 only from 0.75)
    assert power_of_two_entries(torch.tensor([0.75]), 3, top="inq").flatten().tolist() == [0.0, 1.0, -1.0]
    assert power_of_two_entries(torch.tensor([0.74]), 3, top="inq").flatten().tolist() == [0.0, 0.5, -0.5]
    assert power_of_two_entries(torch.zeros(3), 3).flatten().tolist() == [0.0, 1.0, -1.0]
    with pytest.raises(QuantizationConfigError, match=r"`num_entries` must be an odd positive integer"):
        power_of_two_entries(x, 4)
    with pytest.raises(QuantizationConfigError, match=r"non-finite"):
        power_of_two_entries(torch.tensor([float("inf")]), 3)
