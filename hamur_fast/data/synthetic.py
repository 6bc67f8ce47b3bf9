"""A synthetic multi-domain click data set with a known generative process (the demo's default data).

Generative process, every draw from ``numpy.random.default_rng(seed)``:

1. Domains ``d = 0..D-1`` with shares ``pi`` (default 0.55, 0.37, 0.08: domain 2 is rare; ``domains=D``
   instead gives Zipf-like shares ``pi_d ~ 1 / (d + 1)^zipf``, the skew of real multi-scenario logs: a few
   large domains and a long tail of rare ones). Each user belongs to one domain (like the MovieLens age
   groups): user ``u`` gets domain ``d`` with probability ``pi_d``.
2. Latent tastes: user factors ``p_u ~ N(0, I_r)``, item factors ``q_i ~ N(0, I_r)``. Each domain mixes a
   shared taste matrix with its own: ``A_d = sqrt(1 - rho) S + sqrt(rho) R_d``, entries of ``S`` and ``R_d``
   ~ N(0, 1/r). ``rho`` (``specificity``) = 0 gives every domain the same click pattern; 1 unrelated ones.
3. Context fields ``ctx_a`` (24 values) and ``ctx_b`` (8 values) with effects ``g_d[v] = sqrt(1-rho) g[v] +
   sqrt(rho) g'_d[v]``, both ~ N(0, 0.5^2); dense ``x_num ~ U(0, 1)`` and ``x_gauss ~ N(0, 1)`` with per-domain
   slopes ``w_d ~ N(0, 1)`` (signs differ between domains).
4. A row: domain ``d ~ pi``; a user of domain ``d`` uniformly; an item by Zipf-like popularity
   ``P(i) ~ 1 / (i + 10)``; context values uniformly; then
   ``logit = b_d + c_u + h_d[i] + p_u A_d q_i + g_d[ctx_a] + g_d[ctx_b] + w_d . x``,
   ``click ~ Bernoulli(sigmoid(logit))``, with a user bias ``c_u ~ N(0, 0.6^2)`` and an item bias ``h_d``
   that mixes shared and domain parts like ``g_d`` (scale 0.8). Biases ``b_d`` spread from -1.2 to 0 set
   different click rates per domain.

Columns: user_id, item_id, ctx_a, ctx_b, x_num, x_gauss, domain (0..D-1), click.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import DataError
from .schema import Schema
from .splits import encode_splits, frames_by_split, random_split

DEFAULT_SHARES = (0.55, 0.37, 0.08)


def zipf_shares(num_domains: int, exponent: float = 1.0) -> tuple:
    """Shares proportional to ``1 / (d + 1) ** exponent`` for d = 0..D-1 (domain 0 the largest)."""
    if num_domains < 1 or exponent < 0:
        raise DataError(f"need domains >= 1 and zipf >= 0, got domains={num_domains} and zipf={exponent}")
    weights = 1.0 / np.arange(1, num_domains + 1, dtype=np.float64) ** exponent
    return tuple(weights / weights.sum())


def domain_shares(shares=None, domains: int | None = None, zipf: float = 1.0) -> tuple:
    """The shares to draw from: explicit ``shares``, Zipf-like ones for ``domains``, else the default three."""
    if shares is not None and domains is not None:
        raise DataError("give either data.shares or data.domains, not both")
    if domains is not None:
        if isinstance(domains, bool) or not isinstance(domains, (int, np.integer)):
            raise DataError(f"data.domains must be an integer number of domains, got {domains!r}")
        return zipf_shares(int(domains), zipf)
    return tuple(shares) if shares is not None else DEFAULT_SHARES


def synthetic_schema(num_domains: int) -> Schema:
    return Schema(label="click", domain="domain", domain_mapping={d: d for d in range(num_domains)},
                  sparse=["user_id", "item_id", "ctx_a", "ctx_b"], dense=["x_num", "x_gauss"])


def generate(rows: int = 40_000, seed: int = 0, shares=None, users: int = 600, items: int = 300,
             rank: int = 8, specificity: float = 0.6, domains: int | None = None, zipf: float = 1.0) -> pd.DataFrame:
    """Draw ``rows`` clicks by the process in the module docstring; the same arguments give the same frame.

    ``shares`` (summing to 1) or ``domains`` (Zipf-like shares with exponent ``zipf``) set the domains.
    """
    shares = np.asarray(domain_shares(shares, domains, zipf), dtype=np.float64)
    if rows < 1 or len(shares) < 1 or (shares <= 0).any() or not np.isclose(shares.sum(), 1.0):
        raise DataError(f"need rows >= 1 and positive domain shares summing to 1, got {rows} and {list(shares)}")
    if users < len(shares):
        raise DataError(f"need at least one user per domain: users={users} < {len(shares)} domains")
    if not 0.0 <= specificity <= 1.0:
        raise DataError(f"specificity must be in [0, 1], got {specificity}")
    rng = np.random.default_rng(seed)
    num_domains = len(shares)
    mix = np.sqrt(1 - specificity), np.sqrt(specificity)

    user_domain = rng.choice(num_domains, size=users, p=shares)
    for d in range(num_domains):  # every domain keeps at least one user, however rare
        if not (user_domain == d).any():  # taken from a domain that has users to spare
            spare = np.flatnonzero(np.bincount(user_domain, minlength=num_domains)[user_domain] > 1)
            user_domain[rng.choice(spare)] = d
    user_factors, item_factors = rng.normal(size=(users, rank)), rng.normal(size=(items, rank))
    shared = rng.normal(scale=rank ** -0.5, size=(rank, rank))
    tastes = mix[0] * shared + mix[1] * rng.normal(scale=rank ** -0.5, size=(num_domains, rank, rank))
    context_effects = [mix[0] * rng.normal(scale=0.5, size=n) + mix[1] * rng.normal(scale=0.5, size=(num_domains, n))
                       for n in (24, 8)]
    slopes = rng.normal(size=(num_domains, 2))
    biases = np.linspace(-1.2, 0.0, num_domains)
    user_bias = rng.normal(scale=0.6, size=users)
    item_bias = mix[0] * rng.normal(scale=0.8, size=items) + mix[1] * rng.normal(scale=0.8, size=(num_domains, items))

    domain = rng.choice(num_domains, size=rows, p=shares)
    user = _user_in_domain(rng, user_domain, domain)
    popularity = 1.0 / (np.arange(items) + 10.0)
    item = rng.choice(items, size=rows, p=popularity / popularity.sum())
    ctx = [rng.integers(len(effect[0]), size=rows) for effect in context_effects]
    dense = np.stack([rng.uniform(size=rows), rng.normal(size=rows)], axis=1)

    taste = np.einsum("br,brs,bs->b", user_factors[user], tastes[domain], item_factors[item])
    context = sum(effect[domain, value] for effect, value in zip(context_effects, ctx))
    logit = (biases[domain] + user_bias[user] + item_bias[domain, item] + taste + context
             + (slopes[domain] * dense).sum(axis=1))
    click = (rng.uniform(size=rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    frame = pd.DataFrame({"user_id": user, "item_id": item, "ctx_a": ctx[0], "ctx_b": ctx[1],
                          "x_num": dense[:, 0].astype(np.float32), "x_gauss": dense[:, 1].astype(np.float32),
                          "domain": domain, "click": click})
    frame.index = pd.RangeIndex(1, rows + 1)  # "line numbers" for error messages, as for files
    return frame


def _user_in_domain(rng, user_domain: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """For each row, a uniformly drawn user among the users of the row's domain (vectorised)."""
    by_domain = np.argsort(user_domain, kind="stable")
    counts = np.bincount(user_domain, minlength=domain.max() + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offset = (rng.uniform(size=len(domain)) * counts[domain]).astype(np.int64)
    return by_domain[starts[domain] + offset]


def load_synthetic(rows: int = 40_000, seed: int = 0, split=(0.8, 0.1, 0.1), split_seed: int = 2022,
                   feature_map=None, shard=None, **process):
    """Encoded splits of freshly generated data (``process``: shares or domains and zipf, users, items, rank,
    specificity). ``shard``: only those training rows are encoded (every row is drawn: the draws are
    vectorised over all rows, so a subset could not be drawn alone)."""
    frame = generate(rows, seed, **process)
    num_domains = len(domain_shares(process.get("shares"), process.get("domains"), process.get("zipf", 1.0)))
    schema = feature_map.schema if feature_map is not None else synthetic_schema(num_domains)
    return encode_splits(frames_by_split(random_split(frame, split, split_seed), "synthetic data", shard), schema,
                         None, feature_map)
