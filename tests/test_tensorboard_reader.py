"""The event-file reader reads back what tensorboardX writes, and rejects corrupted files."""

import numpy as np
import pytest

tensorboardX = pytest.importorskip("tensorboardX")

from gradkit import _tensorboard  # noqa: E402


def _write(log_dir):
    writer = tensorboardX.SummaryWriter(str(log_dir))
    for step in range(3):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.add_histogram("grads", np.arange(10.0), 2)
    writer.close()


def test_reads_scalars_and_histograms_back(tmp_path):
    _write(tmp_path)
    scalars = _tensorboard.read_scalars(tmp_path)
    assert [step for step, _ in scalars["loss"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    ((step, histo),) = _tensorboard.read_histograms(tmp_path)["grads"]
    assert step == 2 and histo.num == 10 and histo.max == 9.0


def test_corrupted_file_is_reported(tmp_path):
    _write(tmp_path)
    (path,) = _tensorboard.event_files(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        _tensorboard.read_events(path)
