"""Expert weight formats: how one expert's weights are packed into bytes and computed from them.

Importing this package registers every format: the dense ones (bf16, fp16, fp32), bitsandbytes'
int8, nf4 (alias int4) and fp4, and HQQ's hqq8, hqq4, hqq3 and hqq2 (alias int2). The quantization
libraries themselves are imported only when a format that needs them is used.
"""

from specmd.quant import bnb_formats, hqq_formats
from specmd.quant.formats import (
    ExpertFormat,
    ExpertShape,
    MissingBackendError,
    canonical_name,
    get_format,
    precision_of_dtype,
    registered_formats,
)

del bnb_formats, hqq_formats  # imported for their registrations

__all__ = [
    "ExpertFormat",
    "ExpertShape",
    "MissingBackendError",
    "canonical_name",
    "get_format",
    "precision_of_dtype",
    "registered_formats",
]
