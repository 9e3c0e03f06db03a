"""Weight sharing: k-means codebooks with codebook fine-tuning, and HashedNets buckets."""

from deepshrink.compress.share.hashing import HashShare, position_hash
from deepshrink.compress.share.kmeans import kmeans_1d
from deepshrink.compress.share.kmeans_share import KMeansShare, tie_to_codebooks
from deepshrink.compress.share.shared import codebook_of, tie, untie

__all__ = ["HashShare", "KMeansShare", "position_hash", "codebook_of", "kmeans_1d", "tie", "tie_to_codebooks", "untie"]
