"""Topics of a document-term count matrix with the Kullback-Leibler loss.

A synthetic corpus (no download): five themes, each with its own words, plus words every
document uses. Each document mixes a few themes; its word counts are drawn from that mixture.
NMF with β = 1 (KL, the Poisson likelihood of counts) recovers one topic per theme. Run::

    python examples/topics_kl.py --docs 3000
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

import dnmf

THEMES = {
    "sports": "match goal team coach season league player score referee stadium",
    "cooking": "recipe oven flour butter garlic simmer sauce dough spice kitchen",
    "space": "orbit rocket planet galaxy telescope astronaut launch comet moon nebula",
    "music": "guitar melody chord concert album drummer lyrics tempo rhythm piano",
    "finance": "market stock bond interest inflation investor dividend bank credit fund",
}
COMMON = "the and of to in is that it for on with as was at by this".split()


def make_corpus(n_docs: int, seed: int = 0):
    """Counts (n_docs, n_words), the vocabulary, and each theme's word indices."""
    rng = np.random.default_rng(seed)
    vocab = COMMON + [w for words in THEMES.values() for w in words.split()]
    index = {w: i for i, w in enumerate(vocab)}
    topics = np.full((len(THEMES), len(vocab)), 0.002)
    topics[:, : len(COMMON)] = 0.02  # every theme uses the common words
    theme_words = []
    for k, words in enumerate(THEMES.values()):
        ids = [index[w] for w in words.split()]
        topics[k, ids] = rng.uniform(0.5, 1.5, len(ids))
        theme_words.append(set(ids))
    topics /= topics.sum(axis=1, keepdims=True)
    mixtures = rng.dirichlet(np.full(len(THEMES), 0.15), size=n_docs)
    lengths = rng.poisson(120, size=n_docs) + 10
    counts = np.vstack([rng.multinomial(n, m @ topics) for n, m in zip(lengths, mixtures)])
    return counts.astype(np.float64), vocab, theme_words


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000, help="number of documents (default 3000)")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--top", type=int, default=8, help="words shown per topic")
    args = parser.parse_args(argv)

    warnings.simplefilter("ignore", ConvergenceWarning)  # the stop reason is printed below
    counts, vocab, theme_words = make_corpus(args.docs)
    model = dnmf.NMF(len(THEMES), solver="mu", beta_loss="kullback-leibler", init="nndsvda",
                     max_iter=args.max_iter, random_state=0)
    model.fit(counts)
    H = model.components_
    print(f"{counts.shape[0]} documents x {counts.shape[1]} words, {int(counts.sum())} tokens; "
          f"{model.n_iter_} iterations ({model.stop_reason_})")
    common = set(range(len(COMMON)))
    precisions = []
    for k, row in enumerate(H):
        top = [j for j in np.argsort(row)[::-1] if j not in common][: args.top]
        best = max(range(len(THEMES)), key=lambda t: len(theme_words[t] & set(top)))
        precision = len(theme_words[best] & set(top)) / len(top)
        precisions.append(precision)
        print(f"topic {k + 1} ~ {list(THEMES)[best]:<8} ({100 * precision:3.0f}% of top words): "
              + " ".join(vocab[j] for j in top))
    print(f"mean precision of the top words: {np.mean(precisions):.2f}")


if __name__ == "__main__":
    main()
