"""Metrics as leaves: feature networks (Inception, DINOv2, the toy's digits classifier) and the Fréchet distance.

Nothing here imports training, sampling or the run spec (a test keeps it so): a metric is a function of
images and files, and scoring a run's snapshots (``ect/fid.py``) is built on top of it.

- ``features``: a feature extractor per metric, from a verified file: clean-fid's Inception in its
  ``legacy_tensorflow`` or ``clean`` mode, the digits classifier, DINOv2 (``dinov2``).
- ``frechet``: mean and covariance of features in float64, the Fréchet distance, statistics files.
- ``digits``: the toy's feature network, trained here.
"""
from ect.errors import BadInput

FID_MODES = ("legacy_tensorflow", "clean")  # clean-fid's names; legacy_tensorflow is the paper's protocol
FD_DINOV2 = "fd_dinov2"  # the Fréchet distance in DINOv2 ViT features (EDM2's FD_DINOv2)
METRICS = (*FID_MODES, FD_DINOV2)  # what a statistics file or a result may hold
INCEPTION_FILE = "inception-2015-12-05.pt"  # the only name clean-fid loads Inception from


class FIDError(BadInput):
    pass
