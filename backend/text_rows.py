"""Text encoder outputs kept per token row, so that a row is encoded once.

A guided batch of N images asks for 2N rows of two distinct prompts, and a presenter re-running a prompt with new
seeds asks for the same rows again; each distinct row not seen before is encoded, in one call, and the last few
are kept. A row's key is (encoder index, its token ids, a context): the LoRAs applied and Core ML's compute units
change an encoder's output. Kept rows cost their hidden states' memory (SDXL's 77 x 1280 fp32: 0.4 MB; SD3's T5 at
256 tokens: 4 MB) and nothing else: with reduce-memory an encoder is not even loaded when every row it asks for is
kept.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

from backend.engines.base import EncoderOutput

#: Rows kept per pipeline: the negative and positive prompts of the last few generations, for every encoder.
KEPT_ROWS = 12


class EncodedRows:
    def __init__(self, kept: int = KEPT_ROWS):
        self.kept = kept
        self._rows: OrderedDict = OrderedDict()
        self.encoded = 0  # rows run through an encoder (the rest came from here)

    def encode(self, index: int, ids: np.ndarray, context: str,
               encode_text: Callable[[int, np.ndarray], EncoderOutput]) -> EncoderOutput:
        """encode_text(index, ids)'s output, running only the distinct rows of `ids` not kept; `context` names what
        else decides the output (the LoRAs, the compute units)."""
        keys = [(index, row.tobytes(), context) for row in ids]
        missing = list(dict.fromkeys(k for k in keys if k not in self._rows))
        if missing:
            out = encode_text(index, np.stack([ids[keys.index(k)] for k in missing]))
            self.encoded += len(missing)
            for i, k in enumerate(missing):
                self._rows[k] = (out.hidden[i].copy(), None if out.pooled is None else out.pooled[i].copy())
        rows = [self._rows[k] for k in keys]
        for k in keys:
            self._rows.move_to_end(k)
        while len(self._rows) > self.kept:
            self._rows.popitem(last=False)
        pooled = None if rows[0][1] is None else np.stack([r[1] for r in rows])
        return EncoderOutput(hidden=np.stack([r[0] for r in rows]), pooled=pooled)
