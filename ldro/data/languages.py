"""Language lists of the multilingual experiment (no TensorFlow/seqio import).

The one definition of the XTREME languages, used by the seqio pipeline
(:mod:`ldro.data.text`), the LM experiment's gin defaults and the vocabulary
trainer.
"""

from typing import Mapping, Tuple

#: The 40 XTREME languages (Hu et al., 2020), as named in the data folder.
XTREME_LANGUAGES: Tuple[str, ...] = tuple(
    "af ar bg bn de el en es et eu fa fi fr he hi hu id it ja jv ka kk ko ml mr "
    "ms my nl pt ru sw ta te th tl tr ur vi yo zh".split())

#: XTREME code -> mC4 split name where they differ. mC4 uses the old ISO code
#: ``iw`` for Hebrew; it has Filipino (``fil``) but no ``tl`` (the paper omits
#: Tagalog, footnote 1 of section 5.2.1).
MC4_SPLIT_NAMES: Mapping[str, str] = {"he": "iw", "tl": "fil"}

#: The 39 languages of the paper's mC4 experiment (XTREME minus Tagalog).
PAPER_MC4_LANGUAGES: Tuple[str, ...] = tuple(l for l in XTREME_LANGUAGES if l != "tl")
