"""Synthetic multi-domain data with a planted per-domain signal, and a tiny training loop for tests."""
from __future__ import annotations

import functools

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

NUM_DOMAINS = 3
NUM_FEATURES = 10
INPUT_DIM = NUM_DOMAINS + NUM_FEATURES  # e = [one-hot domain indicator ; features], 13 (odd) wide


def planted_data(rows: int, seed: int):
    """(e, domain, label). Domains of unequal size; each domain clicks on a different direction.

    ``logit = x . (w_shared + w_d) + c_d``: the domain-specific part is twice the shared part. The
    domain indicator is part of ``e`` (as the domain field's embedding is in real data), so the
    domain-blind backbones can still use it, through interactions.
    """
    params = torch.Generator().manual_seed(1234)  # the same planted signal for every split
    w_shared = 0.5 * torch.randn(NUM_FEATURES, generator=params)
    w_domain = torch.randn(NUM_DOMAINS, NUM_FEATURES, generator=params)
    offset = torch.tensor([-1.0, 0.0, 1.0])
    g = torch.Generator().manual_seed(seed)
    domain = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), rows, replacement=True, generator=g)
    x = torch.randn(rows, NUM_FEATURES, generator=g)
    logit = (x * (w_shared + w_domain[domain])).sum(dim=1) + offset[domain]
    label = torch.bernoulli(torch.sigmoid(logit), generator=g)
    e = torch.cat([torch.nn.functional.one_hot(domain, NUM_DOMAINS).float(), x], dim=1)
    return e, domain, label


TRAIN_ROWS, TEST_ROWS = 4096, 2048


@functools.lru_cache(maxsize=None)
def shared_linear_auc(seed: int = 0) -> float:
    """Test AUC of a logistic regression on ``e``: one weight vector for all domains (plus the
    one-hot's offsets). A model beating it has learned some of the per-domain signal."""
    e, _, label = planted_data(TRAIN_ROWS, seed=seed)
    test_e, _, test_label = planted_data(TEST_ROWS, seed=seed + 100)
    fitted = LogisticRegression(max_iter=1000).fit(e.numpy(), label.numpy())
    return roc_auc_score(test_label.numpy(), fitted.predict_proba(test_e.numpy())[:, 1])


def train_and_auc(model, steps: int = 200, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Train ``model`` with Adam on planted data, return its test AUC (scikit-learn) in eval mode."""
    threads = torch.get_num_threads()
    # These models are tiny: a second intra-op thread only adds spin-waiting on a shared 2-core machine.
    torch.set_num_threads(1)
    try:
        return _train_and_auc(model, steps, batch, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train_and_auc(model, steps: int, batch: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    e, domain, label = planted_data(TRAIN_ROWS, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, e.shape[0], (batch,), generator=order)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logits(e[rows], domain[rows]), label[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_e, test_domain, test_label = planted_data(TEST_ROWS, seed=seed + 100)
    with torch.no_grad():
        scores = model(test_e, test_domain)
    return roc_auc_score(test_label.numpy(), scores.numpy())
