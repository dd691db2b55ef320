import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("ECT_TEST_THREADS", "2")))


@pytest.fixture
def small_arch():
    return dict(kind="ect", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], dropout=0.0)
