"""Text corpora: builtin ones shipped with carve and the user's own files, split by document."""

from carve.corpora.corpus import BUILTIN, Corpus, builtin_corpora

__all__ = ["BUILTIN", "Corpus", "builtin_corpora"]
