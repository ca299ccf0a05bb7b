"""Expert weight formats: how one expert's weights are packed into bytes and computed from them."""

from specmd.quant.formats import ExpertFormat, ExpertShape, get_format, precision_of_dtype

__all__ = ["ExpertFormat", "ExpertShape", "get_format", "precision_of_dtype"]
