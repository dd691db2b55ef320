"""Metrics are leaves: the feature networks and the Fréchet distance import nothing of training, sampling, the
run spec or the pipeline's scoring steps."""
import json
import subprocess
import sys

from tests.helpers import ROOT

FORBIDDEN = ("ect.train", "ect.sample", "ect.loss", "ect.networks", "ect.networks_edm2", "ect.checkpoint", "ect.spec",
             "ect.layout", "ect.fid", "ect.cli", "ect.scaling", "ect.report")


def test_the_metrics_package_imports_nothing_of_training_or_sampling():
    code = ("import json, sys\n"
            "import ect.metrics, ect.metrics.features, ect.metrics.frechet, ect.metrics.dinov2, ect.metrics.digits\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ect'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout)
    assert "ect.metrics.dinov2" in loaded
    assert not [m for m in loaded if m in FORBIDDEN or m.startswith(tuple(f + "." for f in FORBIDDEN))], loaded
