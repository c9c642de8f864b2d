"""training: datasets, torch models, train / evaluate / export with parity checks, model cards. Nothing imports training."""
