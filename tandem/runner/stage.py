"""The rows of the runner's per-step staging buffer (pure constants).

``ModelRunner.stage`` is [COUNT, max_num_seqs] int32 on the device. Rows IDS..SRC are a
CUDA-graph batch's inputs, copied from the host in one piece each step; SAMPLED holds the
ids the last launched iteration sampled, written on the device (by the graph's argmax or
by the sampler), which the next iteration reads for tokens the host does not know yet.
"""

from __future__ import annotations


class StageRows:
    IDS, POS, SLOT, LEN, SRC, SAMPLED = range(6)
    COUNT = 6
    STAGED = 5  # rows 0..4 come from the host each step; SAMPLED is written on the device
